"""The one plug-in mechanism (`tailmon.registry.Registry`): registering, looking up, listing, and
lazy entries whose module is imported on first use only."""

import sys

import pytest

from tailmon.errors import InputError, SpecError
from tailmon.registry import Registry


def make() -> Registry:
    reg = Registry("widget")

    @reg.register("beta", syntax="beta:N", description="the second", weight=2)
    def beta(arg):
        return f"beta {arg}"

    reg.register("alpha", description="the first")(str.upper)
    return reg


def test_a_registered_plugin_is_found_with_its_metadata():
    reg = make()
    entry = reg.get("beta")
    assert entry.load()("x") == "beta x" and reg.load("alpha")("a") == "A"
    assert (entry.name, entry.syntax, entry.description, dict(entry.meta)) == ("beta", "beta:N", "the second",
                                                                               {"weight": 2})
    assert reg.get("alpha").syntax == "alpha"  # no syntax given: the name is how it is written
    assert "beta" in reg and "gamma" not in reg and len(reg) == 2


def test_the_decorator_returns_the_plugin_unchanged():
    reg = Registry("widget")

    def plugin():
        return 1

    assert reg.register("one")(plugin) is plugin


def test_iteration_keeps_registration_order():
    reg = make()
    assert [e.name for e in reg] == ["beta", "alpha"] and reg.names() == ("beta", "alpha")


def test_an_unknown_name_is_an_input_error_listing_the_known_names():
    with pytest.raises(InputError, match=r"^unknown widget 'gamma' \(known: alpha, beta\)$"):
        make().get("gamma")
    with pytest.raises(InputError, match=r"^unknown widget 'gamma' \(known: alpha, beta\)$"):
        make().load("gamma")


def test_the_unknown_name_message_can_quote_the_whole_spec_list_syntaxes_and_raise_a_subclass():
    reg = Registry("gadget", error=SpecError, known="syntaxes")
    reg.register("zeta", syntax="zeta:PATH")(print)
    reg.register("eta", syntax="eta:T")(print)
    with pytest.raises(SpecError, match=r"^unknown gadget 'nope:1' \(known: zeta:PATH, eta:T\)$"):
        reg.get("nope", subject="nope:1")


def test_a_name_registers_once_and_must_be_lowercase():
    reg = make()
    with pytest.raises(ValueError, match="widget name 'beta' is already registered"):
        reg.register("beta")(print)
    with pytest.raises(ValueError, match=r"must match \[a-z\]"):
        reg.register("Bad Name")(print)
    with pytest.raises(ValueError, match="must be 'package.module:attribute'"):
        reg.register_lazy("lazy", "no_colon_here")
    assert len(reg) == 2


def test_a_copy_registers_on_its_own():
    reg = make()
    other = reg.copy()
    other.register("gamma")(print)
    assert "gamma" in other and "gamma" not in reg


def test_a_lazy_entry_imports_its_module_on_first_load_only(tmp_path, monkeypatch):
    (tmp_path / "tailmon_test_lazy_plugin.py").write_text(
        "class Maker:\n"
        "    @classmethod\n"
        "    def build(cls, x):\n"
        "        return ('built', x)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tailmon_test_lazy_plugin", raising=False)
    reg = Registry("widget")
    reg.register_lazy("maker", "tailmon_test_lazy_plugin:Maker.build", description="lazy", fast=True)
    entry = reg.get("maker")
    assert entry.lazy and entry.meta["fast"] is True and [e.name for e in reg] == ["maker"]
    assert "tailmon_test_lazy_plugin" not in sys.modules  # registering, listing, reading metadata
    assert reg.load("maker")(3) == ("built", 3)
    assert "tailmon_test_lazy_plugin" in sys.modules and not entry.lazy
