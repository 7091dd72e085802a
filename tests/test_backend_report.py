"""No silent fallback: which SSD implementation runs is said once at start and recorded with the run; "auto" on CUDA
without a working mamba-ssm warns with the import error and the install command; "triton" where it cannot run stops
with one error line."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import load, run_in_process, write_fixture, write_run_config
from lightning.pytorch.loggers import WandbLogger

from tim4rec_pl.errors import UserError
from tim4rec_pl.lightning_module import SeqRecModule
from tim4rec_pl.model import ssd
from tim4rec_pl.model.sasrec import SASRec
from tim4rec_pl.model.tim4rec import TiM4Rec


@pytest.fixture
def mamba_broken(monkeypatch):
    """mamba-ssm fails to import, whatever is installed here (None in sys.modules makes `import` raise)."""
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)
    ssd._mamba_available.cache_clear()
    yield
    ssd._mamba_available.cache_clear()


@pytest.fixture
def log_lines(monkeypatch):
    """The messages of the package's logger, at INFO and above."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("tim4rec_pl")
    monkeypatch.setattr(logger, "level", logging.INFO)
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def test_auto_on_cuda_without_mamba_warns_with_the_reason(mamba_broken) -> None:
    resolved, reason, warning = ssd.explain_backend("auto", "cuda")
    assert resolved == "torch" and "mamba-ssm does not import" in reason
    assert "ModuleNotFoundError" in warning and "mamba_ssm" in warning  # the import error itself
    assert ssd.INSTALL_COMMAND in warning and "\n" not in warning


def test_auto_on_cuda_with_mamba_and_elsewhere(monkeypatch) -> None:
    monkeypatch.setattr(ssd, "_mamba_available", lambda: True)
    assert ssd.explain_backend("auto", "cuda") == ("triton", "auto: CUDA with mamba-ssm's fused kernel", None)
    assert ssd.explain_backend("triton", "cuda")[::2] == ("triton", None)
    resolved, reason, warning = ssd.explain_backend("auto", "cpu")
    assert (resolved, warning) == ("torch", None) and "cpu" in reason  # no warning: the kernel is CUDA-only
    assert ssd.explain_backend("torch", "cuda") == ("torch", "ssd_backend: torch", None)


def test_triton_where_it_cannot_run_is_one_error_line(mamba_broken) -> None:
    for device, needs in (("cpu", "CUDA device"), ("cuda", "mamba-ssm")):
        with pytest.raises(UserError, match=needs) as err:
            ssd.explain_backend("triton", device)
        assert "\n" not in str(err.value) and "tim4rec-pl[gpu]" in str(err.value)


class _FakeWandb(WandbLogger):
    """Records what a W&B logger would receive, without W&B."""

    def __init__(self) -> None:  # noqa: D107 (no W&B run)
        self.params: dict = {}
        self._summary: dict = {}

    @property
    def experiment(self):  # noqa: D102
        return SimpleNamespace(summary=self._summary)

    def log_hyperparams(self, params, *args, **kwargs) -> None:  # noqa: D102
        self.params.update(params)


def _module(network, device: str, logger) -> SeqRecModule:
    module = SeqRecModule(network)
    module._device = (
        torch.device(device, 0) if device == "cuda" else torch.device(device)
    )  # where the hook believes it runs (nothing is moved)
    module._trainer = SimpleNamespace(is_global_zero=True, loggers=[logger])
    return module


def test_fallback_on_cuda_is_announced_once_and_recorded(mamba_broken, log_lines) -> None:
    logger = _FakeWandb()
    module = _module(TiM4Rec(30, max_seq_len=8, d_model=16, head_dim=8, d_state=8), "cuda", logger)
    module.on_fit_start()
    module.on_validation_start()  # later hooks of the same run say nothing more
    module.on_test_start()
    warnings = [line for line in log_lines if "warning" in line]
    assert len(warnings) == 1 and "ModuleNotFoundError" in warnings[0] and ssd.INSTALL_COMMAND in warnings[0]
    assert [line for line in log_lines if "SSD backend" in line] == [
        "tim4rec-pl: SSD backend: torch (auto: mamba-ssm does not import)"
    ]
    assert logger.params == {"ssd_backend_resolved": "torch"} and logger._summary == {"ssd_backend": "torch"}
    assert module.ssd_backend_resolved == "torch"


def test_triton_on_cpu_stops_at_fit_start(mamba_broken) -> None:
    network = TiM4Rec(30, max_seq_len=8, d_model=16, head_dim=8, d_state=8, ssd_backend="triton")
    with pytest.raises(UserError, match="ssd_backend 'triton' needs a CUDA device"):
        _module(network, "cpu", _FakeWandb()).on_fit_start()


def test_network_without_ssd_reports_nothing(log_lines) -> None:
    logger = _FakeWandb()
    _module(SASRec(30, max_seq_len=8, d_model=16), "cpu", logger).on_fit_start()
    assert not log_lines and not logger.params


def test_cli_fit_prints_and_records_the_backend(tmp_path, capsys) -> None:
    cfg = write_run_config(tmp_path / "run", write_fixture(tmp_path / "tiny.inter"), tmp_path / "data", max_epochs=1)
    assert run_in_process("fit", "--config", str(cfg)) == 0
    err = capsys.readouterr().err
    assert (
        err.count("tim4rec-pl: SSD backend: torch (auto: the fused kernel runs on CUDA only, this run is on cpu)") == 1
    )
    hparams = yaml.safe_load(next((tmp_path / "run" / "csv").rglob("hparams.yaml")).read_text())
    assert hparams["ssd_backend_resolved"] == "torch"
    assert load(tmp_path / "run" / "checkpoints" / "best.ckpt")["tim4rec_pl"]["ssd_backend"] == "torch"


def test_cli_triton_on_cpu_is_one_error_line(tmp_path, capsys) -> None:
    cfg = write_run_config(tmp_path / "run", write_fixture(tmp_path / "tiny.inter"), tmp_path / "data", max_epochs=1)
    code = run_in_process("fit", "--config", str(cfg), "--model.network.init_args.ssd_backend", "triton")
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("tim4rec-pl: error:")]
    assert len(errors) == 1 and "ssd_backend 'triton' needs a CUDA device" in errors[0]
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training step
