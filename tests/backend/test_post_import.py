"""`compat.when_imported`: callbacks run right after a module's first import, or at once if already imported;
and FixedSteps reaches SGLang's algorithm table that way without being imported at registration."""

import subprocess
import sys

from sglang_mage.compat import when_imported


def test_callback_runs_after_first_import(tmp_path, monkeypatch):
    pkg = tmp_path / "mage_probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported("mage_probe_pkg", lambda m: seen.append(m.VALUE + 1))
    assert seen == []
    import mage_probe_pkg

    assert seen == [42]
    assert type(mage_probe_pkg.__loader__).__name__ != "_NotifyingLoader"
    when_imported("mage_probe_pkg", lambda m: seen.append("now"))  # already imported: runs at once
    assert seen == [42, "now"]
    del sys.modules["mage_probe_pkg"]


def test_fixed_steps_is_registered_lazily_in_a_fresh_process():
    code = (
        "import sys\n"
        "from types import SimpleNamespace\n"
        "from sglang.srt.plugins import load_plugins\n"
        "load_plugins()\n"
        "assert 'sglang.srt.dllm.algorithm' not in sys.modules, 'imported at registration'\n"
        "from sglang.srt.dllm.algorithm import algo_name_to_cls, get_algorithm\n"
        "assert {'LowConfidence', 'JointThreshold', 'FixedSteps'} <= set(algo_name_to_cls), algo_name_to_cls\n"
        "algo = get_algorithm(SimpleNamespace(algorithm='FixedSteps', algorithm_config={'steps': 2}, block_size=4,"
        " mask_id=9))\n"
        "assert type(algo).__name__ == 'FixedSteps' and algo.steps == 2\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
