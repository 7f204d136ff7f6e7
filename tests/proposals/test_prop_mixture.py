"""Proposals: spec parsing, the variants they make, truncation rules, and the defensive mixture."""

import numpy as np
import pytest

from tailmon.engines.base import Decoding, Variant
from tailmon.errors import InputError, SpecError
from tailmon.proposals import (
    LoraProposal,
    SystemPromptProposal,
    TemperatureProposal,
    build_mixture,
    parse_proposal,
)

TARGET = Variant("target", Decoding(temperature=0.7, max_new_tokens=5), system_prompt="deployed")
TRUNCATED = Variant("target", Decoding(temperature=0.7, top_p=0.8, top_k=6, max_new_tokens=5))


def test_parse_specs(lora_adapter):
    s = parse_proposal("system:Sure, here is: yes")
    assert isinstance(s, SystemPromptProposal) and s.text == "Sure, here is: yes" and s.spec == "system:Sure, here is: yes"
    t = parse_proposal("temperature:1.5")
    assert isinstance(t, TemperatureProposal) and t.temperature == 1.5 and t.spec == "temperature:1.5"
    lo = parse_proposal(f"lora:{lora_adapter}@0.5")
    assert isinstance(lo, LoraProposal) and lo.path == lora_adapter and lo.scale == 0.5
    assert parse_proposal(f"lora:{lora_adapter}").scale == 1.0
    assert parse_proposal("lora:/x/name@v2").path == "/x/name@v2"  # a non-numeric tail is part of the path


@pytest.mark.parametrize("spec", ["steer", "unknown:1", "system:", "temperature", "temperature:abc",
                                  "temperature:0", "temperature:-1", "lora:", "lora:@0.5"])
def test_bad_specs(spec):
    with pytest.raises(SpecError):
        parse_proposal(spec)


def test_an_unknown_kind_lists_every_kind_by_its_syntax():
    with pytest.raises(SpecError, match=r"^unknown proposal 'bogus:x' \(known: system:TEXT, temperature:T, "
                                        r"lora:PATH\[@SCALE\], steer:PATH@COEF\[@LAYERS\], ablate:PATH@ALPHA"):
        parse_proposal("bogus:x")


def test_a_registered_proposal_kind_is_parsed_and_listed(monkeypatch):
    from click.testing import CliRunner

    import tailmon.proposals
    from tailmon.cli.main import main
    from tailmon.proposals import spec as spec_module

    registry = spec_module.PROPOSALS.copy()  # the real registry stays as it was
    monkeypatch.setattr(spec_module, "PROPOSALS", registry)
    monkeypatch.setattr(tailmon.proposals, "PROPOSALS", registry)

    @registry.register("hotter", syntax="hotter:DT", description="the target DT degrees hotter")
    def _hotter(spec, arg):
        return TemperatureProposal(TARGET.decoding.temperature + float(arg))

    assert parse_proposal("hotter:0.5").temperature == pytest.approx(1.2)
    with pytest.raises(SpecError, match=r"proposal 'hotter' needs an argument: hotter:DT"):
        parse_proposal("hotter")
    listed = CliRunner().invoke(main, ["proposals", "list"]).output.splitlines()
    assert listed[-1].split() == ["hotter:DT", "the", "target", "DT", "degrees", "hotter"]


def test_variants_keep_the_deployed_settings():
    s = SystemPromptProposal("be bad").variant(TARGET)
    assert s.system_prompt == "be bad" and s.decoding == TARGET.decoding and s.adapter is None
    t = TemperatureProposal(1.5).variant(TARGET)
    assert t.decoding.temperature == 1.5 and t.decoding.max_new_tokens == 5
    assert t.system_prompt == "deployed"  # p and q condition on the same prompt


def test_lora_variant(lora_adapter, tmp_path):
    v = LoraProposal(lora_adapter, 0.5).variant(TARGET)
    assert v.adapter == lora_adapter and v.adapter_scale == 0.5 and v.system_prompt == "deployed"
    with pytest.raises(SpecError):
        LoraProposal(str(tmp_path)).variant(TARGET)


def test_truncation_rules():
    # context or weight changes reorder the vocabulary: never truncate
    for proposal in [SystemPromptProposal("x"), TemperatureProposal(0.5)]:
        d = proposal.variant(TRUNCATED).decoding
        assert (d.top_p, d.top_k) == (1.0, 0)
    # a hotter temperature keeps the target's truncation (its nucleus contains the target's)
    d = TemperatureProposal(1.5).variant(TRUNCATED).decoding
    assert (d.top_p, d.top_k, d.temperature) == (0.8, 6, 1.5)
    comps = build_mixture(TRUNCATED, [SystemPromptProposal("x"), TemperatureProposal(1.5), TemperatureProposal(0.5)], 0.1)
    notes = [c.note for c in comps]
    assert notes[0] is None and notes[2] is None
    assert "system:x" in notes[1] and "temperature:0.5" in notes[3]


def test_hotter_nucleus_contains_the_target_nucleus(tiny_engine):
    """The claim behind TemperatureProposal.covers_truncation, checked on the tiny model's
    next-token distributions: every token the target can draw, the hotter proposal can too."""
    target = TRUNCATED
    hotter = TemperatureProposal(1.5).variant(target)
    colder = Variant("c", Decoding(temperature=0.3, top_p=0.8, top_k=6))
    prefixes = [[], [7], [14], [7, 8], [16, 17], [3, 3]]
    missed_by_colder = 0
    for prompt in ["ab", "I cannot", "Sure, here is"]:
        lp_t = tiny_engine.next_token_logprobs(prompt, target, prefixes)
        lp_h = tiny_engine.next_token_logprobs(prompt, hotter, prefixes)
        lp_c = tiny_engine.next_token_logprobs(prompt, colder, prefixes)
        assert not np.any(np.isfinite(lp_t) & ~np.isfinite(lp_h))
        missed_by_colder += int(np.sum(np.isfinite(lp_t) & ~np.isfinite(lp_c)))
    assert missed_by_colder > 0  # a colder truncating proposal would miss target mass


def test_build_mixture_shares():
    props = [SystemPromptProposal("x"), TemperatureProposal(1.5)]
    comps = build_mixture(TARGET, props, 0.2)
    assert [c.label for c in comps] == ["target", "system:x", "temperature:1.5"]
    assert [c.share for c in comps] == pytest.approx([0.2, 0.4, 0.4])
    assert comps[0].variant == TARGET
    weighted = build_mixture(TARGET, props, 0.1, weights=[1, 3])
    assert [c.share for c in weighted] == pytest.approx([0.1, 0.225, 0.675])
    assert sum(c.share for c in build_mixture(TARGET, props, 0.0)) == pytest.approx(1.0)


@pytest.mark.parametrize("args", [
    ([], 0.1, None),
    ([TemperatureProposal(1.5)], 1.0, None),
    ([TemperatureProposal(1.5)], -0.1, None),
    ([TemperatureProposal(1.5)], 0.1, [1, 2]),
    ([TemperatureProposal(1.5)], 0.1, [0]),
])
def test_build_mixture_errors(args):
    proposals, defensive, weights = args
    with pytest.raises(InputError):
        build_mixture(TARGET, proposals, defensive, weights)


def test_importing_proposals_and_parsing_specs_stays_free_of_torch(lora_adapter):
    import subprocess
    import sys

    # LoRA metadata and steering direction files are read when a proposal is parsed: their modules
    # are imported with tailmon.proposals, and must not bring torch with them.
    code = ("import sys, tailmon.proposals as p\n"
            "from tailmon.engines.base import Variant\n"
            f"p.parse_proposal('lora:{lora_adapter}').variant(Variant('t'))\n"
            "print([m for m in ('torch', 'vllm', 'transformers', 'peft') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
