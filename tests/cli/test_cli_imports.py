"""`tailmon --help` stays fast: importing the CLI imports no model library (engines, judges and
proposals are imported by the commands that use them, and their registries load lazily)."""

import subprocess
import sys


def test_importing_the_cli_imports_no_model_library():
    code = ("import sys, tailmon.cli.main\n"
            "print([m for m in ('torch', 'vllm', 'transformers', 'peft') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
