"""Megatron-core's notices about the optional Transformer-Engine / apex are hidden, and nothing else."""
import os
import subprocess
import sys
import warnings

import megatron_ratplus  # noqa: F401  (installs the filters)
from megatron_ratplus.warning_filters import MESSAGES, hide_in_child_processes


def _warn_from(module_name: str, message: str) -> list:
    """Raise ``message`` as a UserWarning attributed to ``module_name``; return what was shown."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        megatron_ratplus.warning_filters.hide_optional_dependency_warnings()   # as the package import did
        exec(compile(f"import warnings\nwarnings.warn({message!r}, UserWarning)", module_name, "exec"),
             {"__name__": module_name})
    return [str(w.message) for w in caught]


def test_megatron_optional_dependency_notices_are_hidden():
    for message in MESSAGES:
        assert _warn_from("megatron.core.optimizer", message + ". Falling back to Torch optimizers.") == []


def test_other_warnings_stay_visible():
    # the same text from another module, and another message from Megatron
    assert _warn_from("my_training_script", "Apex is not installed. Falling back") == ["Apex is not installed. Falling back"]
    assert _warn_from("megatron.core.optimizer", "grad norm is NaN") == ["grad norm is NaN"]


def test_child_processes_inherit_the_filters(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "error::DeprecationWarning")
    hide_in_child_processes()
    hide_in_child_processes()                                 # idempotent
    entries = os.environ["PYTHONWARNINGS"].split(",")
    assert entries[0] == "error::DeprecationWarning"          # the user's filters are kept, first
    assert len(entries) == 1 + len(MESSAGES) and len(set(entries)) == len(entries)
    code = ("import warnings\n"
            "warnings.warn('Apex is not installed. Falling back to Torch Norm', UserWarning)\n"
            "warnings.warn('something else', UserWarning)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert proc.returncode == 0
    assert "Apex is not installed" not in proc.stderr and "something else" in proc.stderr
