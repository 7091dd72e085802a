"""`tim4rec-pl predict`: the written top-K agrees with the `test` metrics and with a brute-force reference that sorts
every item's score; seen-item exclusion covers the whole history; user lists, CSV, atomic writes, one-line errors.

The fixture is a RecBole atomic file with well-separated timestamps (no float32 ties), so a user's history is simply
their rows in time order; histories are longer than the window L = 5, so "the whole history" and "the window" differ.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import NETWORK, NUM_USERS, L, cli, fixture_events, write_events, write_predict_config

from tim4rec_pl.cli import main
from tim4rec_pl.model.tim4rec import TiM4Rec

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    os.environ["WANDB_MODE"] = "disabled"
    tmp = tmp_path_factory.mktemp("predict")
    events = fixture_events()
    cfg = write_predict_config(tmp, write_events(tmp / "events.inter", events))
    cli("fit", "--config", cfg)
    ckpt = tmp / "runs/checkpoints/best.ckpt"
    assert ckpt.is_file()
    return tmp, cfg, ckpt, events


def predict(cfg: Path, ckpt: Path, output: Path, *extra: str | Path) -> pl.DataFrame:
    cli("predict", "--config", cfg, "--ckpt_path", ckpt, "--predictions.output", output, *extra)
    csv = output.suffix == ".csv" or "csv" in extra
    return pl.read_csv(output) if csv else pl.read_parquet(output)


# -- an independent reference: score every item, sort, take the first K --------------------------------------------


def reference_scores(ckpt: Path, events: dict, item_tokens: list[str], mode: str) -> dict[str, np.ndarray]:
    """user -> (num_items,) scores, from a network rebuilt from the checkpoint and windows cut from the raw rows."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    net = TiM4Rec(num_items=len(item_tokens), max_seq_len=L, **NETWORK)
    net.load_state_dict({key.removeprefix("network."): v for key, v in state.items() if key.startswith("network.")})
    net.eval()
    item_id = {tok: i for i, tok in enumerate(item_tokens)}
    seq = torch.zeros(len(events), L, dtype=torch.long)  # (U, L), left-aligned, right-padded with 0
    ts = torch.zeros(len(events), L, dtype=torch.float32)
    lengths = torch.zeros(len(events), dtype=torch.long)
    for row, rows in enumerate(events.values()):
        window = (rows if mode == "next" else rows[:-1])[-L:]
        seq[row, : len(window)] = torch.tensor([item_id[i] for i, _ in window])
        ts[row, : len(window)] = torch.tensor([float(t) for _, t in window])
        lengths[row] = len(window)
    with torch.no_grad():
        scores = net(seq, lengths, ts) @ net.item_embedding.weight.T  # (U, num_items)
    return dict(zip(events, scores.numpy()))


def reference_topk(scores: dict, events: dict, item_tokens: list[str], mode: str, exclude: str | None, k: int) -> dict:
    """user -> [(item token, score)] best first, by sorting every item's score.

    exclude: None, "history" (every item before the scored position) or "window" (only the last L of them).
    """
    out = {}
    for user, rows in events.items():
        history = rows if mode == "next" else rows[:-1]
        banned = {"history": {i for i, _ in history}, "window": {i for i, _ in history[-L:]}, None: set()}[exclude]
        ranked = sorted(range(1, len(item_tokens)), key=lambda i: -float(scores[user][i]))  # item 0 is padding
        out[user] = [(item_tokens[i], float(scores[user][i])) for i in ranked if item_tokens[i] not in banned][:k]
    return out


def rows_by_user(frame: pl.DataFrame) -> dict[str, list[tuple[str, float]]]:
    out: dict[str, list[tuple[str, float]]] = {}
    for user, rank, item, score in frame.select("user_id", "rank", "item_id", "score").iter_rows():
        out.setdefault(str(user), []).append((str(item), float(score)))
        assert rank == len(out[str(user)])  # ranks are 1, 2, 3, ... in row order
    return out


def assert_same_topk(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for user in want:
        assert [i for i, _ in got[user]] == [i for i, _ in want[user]], user
        np.testing.assert_allclose([s for _, s in got[user]], [s for _, s in want[user]], rtol=1e-5, atol=1e-6)


# -- tests ----------------------------------------------------------------------------------------------------------


def test_hr_ndcg_mrr_from_the_file_equal_the_reported_test_metrics(trained, tmp_path):
    _, cfg, ckpt, events = trained
    reported = cli("test", "--config", cfg, "--ckpt_path", ckpt).trainer.callback_metrics
    frame = predict(cfg, ckpt, tmp_path / "test.parquet", "--predictions.mode", "test", "--predictions.top_k", "10")
    assert frame.columns == ["user_id", "rank", "item_id", "score", "target_id"]
    assert frame["user_id"].n_unique() == NUM_USERS and frame.height == NUM_USERS * 10
    targets = dict(frame.select("user_id", "target_id").unique().iter_rows())
    assert targets == {user: rows[-1][0] for user, rows in events.items()}  # the held-out last item
    hit_rank = {user: None for user in targets}
    for user, rank, item, target in frame.select("user_id", "rank", "item_id", "target_id").iter_rows():
        if item == target:
            hit_rank[user] = rank
    for k in (3, 5, 10):
        hits = [r for r in hit_rank.values() if r is not None and r <= k]
        expected = {
            "hr": len(hits) / NUM_USERS,
            "ndcg": sum(1 / math.log2(r + 1) for r in hits) / NUM_USERS,
            "mrr": sum(1 / r for r in hits) / NUM_USERS,
        }
        for name, value in expected.items():
            assert float(reported[f"test/{name}@{k}"]) == pytest.approx(value, abs=1e-6), f"{name}@{k}"
    assert 0 < sum(r is not None for r in hit_rank.values()) < NUM_USERS  # the check is not vacuous


def test_next_and_test_modes_match_a_full_sort_with_and_without_exclusion(trained, tmp_path):
    tmp, cfg, ckpt, events = trained
    from tim4rec_pl.data.datamodule import SeqRecDataModule

    tokens = SeqRecDataModule(path=str(tmp / "events.inter"), data_dir=str(tmp / "data"), max_seq_len=L).item_tokens
    k = 6
    scores = {mode: reference_scores(ckpt, events, tokens, mode) for mode in ("next", "test")}
    for mode, exclude in [("next", None), ("next", "history"), ("test", "history")]:
        extra = ["--predictions.mode", mode, "--predictions.top_k", str(k)]
        extra += ["--predictions.exclude_seen", "true"] if exclude else []
        got = rows_by_user(predict(cfg, ckpt, tmp_path / f"{mode}-{exclude}.parquet", *extra))
        assert_same_topk(got, reference_topk(scores[mode], events, tokens, mode, exclude, k))
        if exclude:  # nothing the user has seen (anywhere in the history) is recommended
            for user, rows in events.items():
                seen = {i for i, _ in (rows if mode == "next" else rows[:-1])}
                assert not seen & {i for i, _ in got[user]}
    # The fixture makes whole-history and window-only exclusion differ, so the check above can tell them apart.
    window = reference_topk(scores["next"], events, tokens, "next", "window", k)
    history = reference_topk(scores["next"], events, tokens, "next", "history", k)
    assert any([i for i, _ in window[u]] != [i for i, _ in history[u]] for u in events)


def test_user_list_in_given_order_to_csv_in_a_new_folder(trained, tmp_path):
    _, cfg, ckpt, _ = trained
    full = predict(cfg, ckpt, tmp_path / "all.parquet", "--predictions.top_k", "4")
    out = tmp_path / "new" / "dir" / "some.csv"
    sub = predict(cfg, ckpt, out, "--predictions.top_k", "4", "--predictions.users", "[u7, u2, u7, u19]")
    assert sub.columns == ["user_id", "rank", "item_id", "score"]
    assert sub["user_id"].unique(maintain_order=True).to_list() == ["u7", "u2", "u19"]  # order kept, duplicate dropped
    for user in ("u7", "u2", "u19"):
        a = full.filter(pl.col("user_id") == user)
        b = sub.filter(pl.col("user_id") == user)
        assert a["item_id"].to_list() == b["item_id"].to_list()
        np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=1e-6)
    assert sorted(p.name for p in out.parent.iterdir()) == ["some.csv"]  # no temporary file left behind
    # The same users from a file, one token per line; --predictions.format overrides the extension.
    users_file = tmp_path / "users.txt"
    users_file.write_text("u19\n\nu2\n")
    frame = predict(cfg, ckpt, tmp_path / "x.out", "--predictions.users", users_file, "--predictions.format", "csv")
    assert frame["user_id"].unique(maintain_order=True).to_list() == ["u19", "u2"]
    assert frame.height == 2 * 10


def test_unknown_users_are_one_line_exit_2(trained, tmp_path, capsys):
    _, cfg, ckpt, _ = trained
    out = tmp_path / "never.parquet"
    args = ["predict", "--config", str(cfg), "--ckpt_path", str(ckpt), "--predictions.output", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--predictions.users", "[u1, nobody, ghost, u3]"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("tim4rec-pl: error: ")
    assert "2 of 4 user tokens" in errors[0] and "'nobody'" in errors[0]
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--predictions.users", str(tmp_path / "missing.txt")])
    assert exit_info.value.code == 2 and "no such file" in capsys.readouterr().err
