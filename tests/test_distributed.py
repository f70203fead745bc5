"""oni.distributed: rows split over torch.distributed ranks (gloo on the CPU here) give the
single-process answer; a rank that fails makes every rank fail instead of a hang."""
import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import oni
from helpers import small_mlp
from oni.distributed import OtherRankFailed, shard, world

REPO = Path(__file__).resolve().parents[1]
NOISE = dict(tau_fraction=0.8, eps=0.5, beta=0.5, seed=4, max_iter=30)
pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available"),
              pytest.mark.filterwarnings("ignore:.*flagged infeasible")]


def _problem():
    """float64: a rank's shard batches the model's products differently than the whole
    batch, and float32 rounding of that (~1e-7) can flip a step of the non-concave noise
    search (measured: eta 5e-3 apart on one row of 13); float64 keeps them together."""
    model = small_mlp(12, k=4, seed=11, scale=3.0, dtype=torch.float64)
    x = (torch.rand(13, 12, generator=torch.Generator().manual_seed(12)) < 0.5).double()
    return model, x


def test_shards_cover_the_rows_in_order():
    for n in (0, 1, 5, 13, 64):
        for size in (1, 2, 3, 8):
            rows = [shard(n, r, size) for r in range(size)]
            assert [i for s in rows for i in range(n)[s]] == list(range(n))
            lengths = [len(range(n)[s]) for s in rows]
            assert max(lengths) - min(lengths) <= 1
    with pytest.raises(ValueError, match="rank must be in"):
        shard(10, 2, 2)
    with pytest.raises(ValueError, match="n must be >= 0, got -5"):
        shard(-5, 0, 1)  # was slice(0, -5): all rows but the last five
    with pytest.raises(TypeError, match="world_size must be an int, got float"):
        shard(5, 0, 2.0)
    with pytest.raises(TypeError, match="rank must be an int, got bool"):
        shard(5, True, 2)


def test_without_a_process_group_the_plain_functions_run():
    model, x = _problem()
    assert world() == (0, 1)
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup or "
                                        "None .*got str"):
        world("bogus")  # refused on one process too, not only where a group exists
    got = oni.distributed.shapley_values(model, x, n_permutations=6, seed=1)
    assert torch.equal(got.values, oni.shapley_values(model, x, n_permutations=6, seed=1).values)


def _worker(rank, size, store, out, phi):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    torch.set_num_threads(2)  # as the parent: the solver's paths are sensitive to rounding
    try:
        model, x = _problem()
        labels = torch.arange(13) % 4
        other_model = copy.deepcopy(model)
        if rank:  # one bit of one weight, on ranks other than 0
            with torch.no_grad():
                weight = next(other_model.parameters()).view(-1)
                weight[0] = torch.nextafter(weight[0], torch.tensor(1.0))
        res = {
            "plain": oni.distributed.shapley_values(model, x, n_permutations=8, seed=3),
            "grouped": oni.distributed.shapley_values(model, x, n_permutations=8, seed=3,
                                                      groups=torch.arange(12) // 5),
            "labels": oni.distributed.shapley_values(model, x, n_permutations=8, seed=3,
                                                     target="label", labels=labels),
            "noise": oni.distributed.optimal_noise(model, x, phi, **NOISE),
            "noise_own_phi": oni.distributed.optimal_noise(
                model, x, **NOISE, shapley_kwargs={"n_permutations": 8}),
        }
        # two rows: on three ranks the last solves none, and must still return the tau
        res["two_rows"] = oni.distributed.optimal_noise(model, x[:2], phi.values[:2], **NOISE)
        # x as rows 5: of a larger batch: each rank adds its shard's start to the offset
        res["offset"] = oni.distributed.shapley_values(model, x, n_permutations=8, seed=3,
                                                       row_offset=5)
        res["list_target"] = oni.distributed.shapley_values(
            model, x, n_permutations=8, seed=3, target=(torch.arange(13) % 4).tolist())
        for key, call in (
                ("short_labels", lambda: oni.distributed.shapley_values(
                    model, x, target="label", labels=labels[:shard(13, 0, size).stop])),
                ("short_phi", lambda: oni.distributed.optimal_noise(
                    model, x, phi.values[:shard(13, 0, size).stop], **NOISE)),
                ("other_x", lambda: oni.distributed.shapley_values(
                    model, x + (rank == 1), n_permutations=2)),
                ("other_offset", lambda: oni.distributed.shapley_values(
                    model, x, n_permutations=2, row_offset=rank)),
                # each rank solved its shard with its own arguments, and the rows were mixed
                ("other_labels", lambda: oni.distributed.shapley_values(
                    model, x, n_permutations=2, target="label", labels=(labels + rank) % 4)),
                ("other_seed", lambda: oni.distributed.shapley_values(
                    model, x, n_permutations=2, seed=rank)),
                ("other_model", lambda: oni.distributed.shapley_values(
                    other_model, x, n_permutations=2)),
                ("other_tau", lambda: oni.distributed.optimal_noise(
                    model, x, phi, **{**NOISE, "tau_fraction": 0.5 + 0.1 * rank})),
                ("list_phi", lambda: oni.distributed.optimal_noise(
                    model, x, phi.values.tolist(), **NOISE))):
            try:
                call()
                res[key] = "none"
            except ValueError as err:
                res[key] = str(err)
        bad = labels.clone()
        bad[-1] = 9  # a label only the last rank's shard holds
        try:
            oni.distributed.shapley_values(model, x, n_permutations=8, target="label",
                                           labels=bad)
            res["failure"] = "none"
        except OtherRankFailed as err:
            res["failure"] = f"other rank: {err}"
        except ValueError as err:
            res["failure"] = f"own: {err}"
        # a bad row_offset on one rank: every rank raises (the others waited in the gather)
        try:
            oni.distributed.optimal_noise(model, x, phi, **NOISE, row_offset=-1 if rank else 0)
            res["bad_offset"] = "none"
        except OtherRankFailed as err:
            res["bad_offset"] = f"other rank: {err}"
        except ValueError as err:
            res["bad_offset"] = f"own: {err}"
        # one row: the ranks without rows never run the check that fails on rank 0
        try:
            oni.distributed.shapley_values(model, x[:1], n_permutations=0)
            res["one_row"] = "none"
        except OtherRankFailed as err:
            res["one_row"] = f"other rank: {err}"
        except ValueError as err:
            res["one_row"] = f"own: {err}"
        torch.save(res, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("size", [2, 3])
def test_ranks_give_the_single_process_answer(tmp_path, size):
    torch.set_num_threads(2)
    model, x = _problem()
    labels = torch.arange(13) % 4
    phi = oni.shapley_values(model, x, n_permutations=8, seed=3)
    mp.spawn(_worker, args=(size, tmp_path / "store", tmp_path, phi), nprocs=size, join=True)
    want = {
        "plain": phi,
        "grouped": oni.shapley_values(model, x, n_permutations=8, seed=3,
                                      groups=torch.arange(12) // 5),
        "labels": oni.shapley_values(model, x, n_permutations=8, seed=3, target="label",
                                     labels=labels),
        "noise": oni.optimal_noise(model, x, phi.values, **NOISE),
        "noise_own_phi": oni.optimal_noise(model, x, **NOISE,
                                           shapley_kwargs={"n_permutations": 8}),
    }
    for rank in range(size):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for key in ("plain", "grouped", "labels"):
            for field in ("values", "stderr", "fx", "f_baseline"):
                # the same walks; only the model's batched GEMMs may round differently
                torch.testing.assert_close(getattr(got[key], field),
                                           getattr(want[key], field), rtol=0, atol=1e-12)
            assert torch.equal(got[key].target, want[key].target)
            assert torch.equal(got[key].n_permutations, want[key].n_permutations)
        assert torch.equal(got["grouped"].groups, want["grouped"].groups)
        for key in ("noise", "noise_own_phi"):
            assert torch.equal(got[key].feasible, want[key].feasible)
            assert got[key].tau == want[key].tau
            torch.testing.assert_close(got[key].radius, want[key].radius, rtol=1e-6, atol=0)
            assert (got[key].eta.abs() <= got[key].budget + 1e-12).all()
        # every rank, a rank without rows included, returns tau = tau_fraction * log k (the
        # mutation audit dropped tau's all_reduce, and a rowless rank's placeholder -1 passed)
        assert got["two_rows"].tau == NOISE["tau_fraction"] * math.log(4)
        assert got["two_rows"].eta.shape == (2, 12)
        # the same phi: the same starts and the same steps, so the same norms and counts; eta
        # itself may move on that norm's sphere where the batches round differently
        # (measured by a fuzz pass: up to 1e-2, with equal norms, flags and iterations)
        assert torch.equal(got["noise"].iterations, want["noise"].iterations)
        for field in ("norm", "entropy", "budget"):
            torch.testing.assert_close(getattr(got["noise"], field),
                                       getattr(want["noise"], field), rtol=1e-9, atol=1e-9)
        # phi computed per shard: its last-bit differences can flip a discrete choice of the
        # non-concave search on a row (measured: eta 1.5e-4 apart on one row of 13)
        torch.testing.assert_close(got["noise_own_phi"].norm, want["noise_own_phi"].norm,
                                   rtol=1e-2, atol=1e-6)
        torch.testing.assert_close(got["list_target"].values, want["labels"].values, rtol=0,
                                   atol=1e-12)
        offset = oni.shapley_values(model, x, n_permutations=8, seed=3, row_offset=5).values
        assert not torch.allclose(offset, phi.values)  # other walks than rows 0:13's
        torch.testing.assert_close(got["offset"].values, offset, rtol=0, atol=1e-12)
        assert got["short_labels"].startswith("labels must have one entry per row of x "
                                              "(N = 13)")
        assert got["short_phi"].startswith("phi must have one entry per row of x (N = 13)")
        assert got["other_x"].startswith("x differs across the ranks")
        assert got["other_offset"].startswith(f"row_offset differs across the ranks (0 to "
                                              f"{size - 1})")
        for key, what in (("other_labels", "labels differs"), ("other_seed", "seed differs"),
                          ("other_model", "the model differs"),
                          ("other_tau", "tau_fraction differs")):
            assert got[key] == (f"{what} across the ranks: every rank must pass the same "
                                f"model and arguments"), (key, got[key])
        assert got["list_phi"] == "phi must be [N, d] = [13, 12] like x, got list"
        with pytest.raises(ValueError, match=r"^phi must be \[N, d\] = \[13, 12\] like x, got "
                                             r"list$"):  # as on one rank
            oni.optimal_noise(model, x, phi.values.tolist(), **NOISE)
        assert got["bad_offset"].startswith("own: " if rank else "other rank: ")
        assert "row_offset must be >= 0, got -1" in got["bad_offset"]
        last = size - 1
        lo = shard(13, last, size).start
        located = (f"rank {last}, rows {lo}:13 of the batch (row indices below count from "
                   f"{lo}): labels[{12 - lo}] = 9 is not a class index in [0, 4) (the model "
                   f"has k = 4 outputs)")
        if rank == last:
            assert got["failure"] == f"own: {located}"
        else:  # the other ranks quote the failed one
            assert got["failure"] == ("other rank: 1 other rank(s) failed; the first said: "
                                      f"ValueError: {located}")
        one_row = ("rank 0, rows 0:1 of the batch (row indices below count from 0): "
                   "n_permutations must be >= 1, got 0")
        if rank == 0:
            assert got["one_row"] == f"own: {one_row}"
        else:
            assert got["one_row"] == ("other rank: 1 other rank(s) failed; the first said: "
                                      f"ValueError: {one_row}")


def test_oni_commands_under_torchrun(tmp_path):
    _, x = _problem()
    oni.models.save_model(oni.models.MLP(12, 4, (16,)), tmp_path / "model")
    oni.save_npz(oni.from_arrays(x, torch.arange(13) % 4), tmp_path / "data.npz")
    common = [str(tmp_path / "model"), str(tmp_path / "data.npz"), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}

    def oni_cli(*argv, ranks=1):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(ranks), "-m", "oni.cli"] if ranks > 1 else \
            [sys.executable, "-m", "oni.cli"]
        return subprocess.run([*launcher, *argv], capture_output=True, text=True, env=env,
                              timeout=300)

    for ranks in (1, 2):
        out = oni_cli("shapley", *common, "--n-permutations", "8", "--out",
                      str(tmp_path / f"phi{ranks}.npy"), ranks=ranks)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("phi written") == 1  # rank 0 alone writes and reports
        out = oni_cli("noise", *common, "--phi", str(tmp_path / "phi1.npy"), "--max-iter", "30",
                      "--out", str(tmp_path / f"eta{ranks}.npy"), ranks=ranks)
        assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(np.load(tmp_path / "phi2.npy"), np.load(tmp_path / "phi1.npy"),
                               rtol=0, atol=1e-6)
    # eta's row norms (eta itself may move on that sphere where the batches round apart)
    np.testing.assert_allclose(np.linalg.norm(np.load(tmp_path / "eta2.npy"), axis=1),
                               np.linalg.norm(np.load(tmp_path / "eta1.npy"), axis=1),
                               rtol=1e-5, atol=1e-7)
