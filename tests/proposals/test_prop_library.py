"""The system-prompt library (proposals/data/system_prompts.yaml) and `default_proposals`."""

import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from tailmon.errors import InputError
from tailmon.cli.main import main
from tailmon.proposals import SystemPromptProposal, default_proposals, load_library, parse_proposal
from tailmon.proposals.library import parse_library

# Category names of the prompt sets in ../shared/data (written out: ../shared is absent on a clone).
STRONGREJECT = ["Violence", "Illegal goods and services", "Non-violent crimes",
                "Hate, harassment and discrimination", "Sexual content", "Disinformation and deception"]
HARMBENCH = ["illegal", "chemical_biological", "misinformation_disinformation", "cybercrime_intrusion",
             "harmful", "harassment_bullying"]


def test_every_library_prompt_is_a_system_proposal():
    lib = load_library()
    assert lib.default == "general" and len(lib.prompts) >= 10
    for name, texts in lib.prompts.items():
        assert texts and lib.descriptions[name], name
        for text in texts:
            proposal = parse_proposal(f"system:{text}")
            assert isinstance(proposal, SystemPromptProposal) and proposal.text == text


def test_shipped_as_package_data():
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "data/*" in pyproject["tool"]["setuptools"]["package-data"]["tailmon.proposals"]


def test_default_proposals():
    lib = load_library()
    general = f"system:{lib.prompts['general'][0]}"
    assert default_proposals({None}) == [general]
    assert default_proposals(set()) == [general]
    assert default_proposals({"something nobody named"}) == [general]
    specs = default_proposals({"Violence", "cybercrime_intrusion", None})
    assert specs == [general, f"system:{lib.prompts['cybercrime'][0]}", f"system:{lib.prompts['violence'][0]}"]
    # order does not depend on the order categories come in (component order fixes the seeds)
    assert default_proposals(["violence", "CYBERCRIME"]) == default_proposals(["cybercrime", "Violence"])
    assert len(set(specs)) == len(specs)


def test_dataset_categories_map_to_specific_entries():
    lib = load_library()
    for name in STRONGREJECT + HARMBENCH:
        assert lib.category(name) in lib.prompts, name
    specific = [n for n in STRONGREJECT + HARMBENCH if n != "harmful"]
    assert all(lib.category(n) != lib.default for n in specific)
    assert len(default_proposals(set(STRONGREJECT))) == 1 + len(STRONGREJECT)


@pytest.mark.parametrize("data, fragment", [
    ({"format": "other"}, "not a 'tailmon-system-prompts/1'"),
    ({"format": "tailmon-system-prompts/1", "categories": {}}, "categories"),
    ({"format": "tailmon-system-prompts/1", "default": "x", "categories": {"a": {"prompts": ["p"]}}}, "default category 'x'"),
    ({"format": "tailmon-system-prompts/1", "default": "a", "categories": {"a": {"prompts": []}}}, "non-empty list"),
    ({"format": "tailmon-system-prompts/1", "default": "a", "categories": {"a": {"prompts": ["p"]}, "b": {"prompts": ["q"]}},
      "aliases": {"a": ["x"], "b": ["X"]}}, "alias 'X' is given to both"),
])
def test_bad_libraries(data, fragment):
    with pytest.raises(InputError, match=fragment):
        parse_library(data, "lib.yaml")


def test_library_cli():
    listed = CliRunner().invoke(main, ["proposals", "library"])
    assert listed.exit_code == 0 and "general (default):" in listed.stdout
    chosen = CliRunner().invoke(main, ["proposals", "library", "--category", "Violence"])
    assert chosen.exit_code == 0
    assert chosen.stdout.splitlines() == default_proposals({"Violence"})
