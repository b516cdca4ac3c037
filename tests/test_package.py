import subprocess
import sys


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_is_light():
    """Importing the package loads no jax; importing every module initialises no device."""
    out = run_python("import sys, nanochat_jax; print('jax' in sys.modules)")
    assert out.strip() == "False"
    out = run_python(
        "import nanochat_jax.config, nanochat_jax.model, nanochat_jax.sharding, nanochat_jax.train, "
        "nanochat_jax.convert, nanochat_jax.attention\n"
        "from jax._src import xla_bridge\nprint(len(xla_bridge._backends))"
    )
    assert out.strip() == "0"


def test_stage_entry_lists_stages_and_rejects_unknown():
    out = run_python("from launch import stage; stage.main(['--help'])")
    assert "base" in out
    proc = subprocess.run([sys.executable, "-m", "launch.stage", "nope"], capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown stage 'nope'" in proc.stderr and "Traceback" not in proc.stderr
