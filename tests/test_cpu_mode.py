"""CPU mode: what has to keep working once it is on (it patches process-wide state, so each check
runs in a fresh interpreter)."""
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU mode is a no-op where CUDA exists")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False,
                          timeout=300)


def test_model_package_imports_after_cpu_mode_is_on():
    """Importing the model after ``enable_cpu_mode`` (as a script does that initialises the process
    group first) meets Megatron's torch.compile decorators; TorchDynamo must accept the patched
    torch.cuda functions."""
    result = run_python("""
        from megatron_ratplus.cpu_mode import enable_cpu_mode
        assert enable_cpu_mode()
        import megatron_ratplus.model  # noqa: F401
        import torch
        torch._dynamo.trace_rules.get_torch_obj_rule_map()
        torch.cuda.synchronize(); torch.cuda.set_device(0); torch.cuda.empty_cache()
        assert torch.cuda.memory_allocated() == 0 and torch.cuda.current_device() == "cpu"
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
