"""Packaging promises: importing the package (CLI included) never imports the optional GPU stack."""

import subprocess
import sys


def test_import_never_loads_mamba_ssm_or_triton():
    code = (
        "import sys\n"
        "import tim4rec_pl, tim4rec_pl.cli, tim4rec_pl.model.ssd, tim4rec_pl.model.tim4rec, tim4rec_pl.model.sasrec\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mamba_ssm', 'triton'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("tim4rec-pl") == "tim4rec_pl.cli:main"
