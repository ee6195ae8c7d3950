"""On a CUDA GPU: the reference against the CPU, the benchmark's JPEG decoding there against
the loader, the two towers sharing one GPU against the reference, and the program training
on the GPU with checkpoints that move to the CPU.
Skipped, with the reason, where torch sees no GPU."""

import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

from launch.checkpoint import load_reference
from launch.cli import check_compile_backend
from launch.ranks import run_ranks
from towers import Architecture, Tower

from conftest import TINY, launch, reference_from_seed
from test_parity import BATCH, CLASSES, SEED, _inputs, _parity_worker, _rel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# A case takes seconds, a compiled one up to a minute or two (a cold cache); on a machine lent
# for a fixed time (.ci/gpu's GPU_BUDGET_S) a hang must cost no more than this. The cheap tests
# come first, the compiled ones last.
TIMEOUT_S = 150


def _needs_inductor():
    """Skips, saying why, where inductor cannot build its kernels here (no C compiler, no Python.h)."""
    try:
        check_compile_backend("inductor", "--compile", "cuda")
    except ValueError as exc:
        pytest.skip(str(exc))


def test_the_reference_on_the_gpu_computes_what_it_computes_on_the_cpu():
    images, labels = _inputs(torch.float64)
    results = {}
    for device in ("cpu", "cuda"):
        model = reference_from_seed(CLASSES, SEED, torch.float64, device)
        logits = model(images.to(device))
        F.cross_entropy(logits, labels.to(device)).backward()
        results[device] = (logits.cpu(), {k: p.grad.cpu() for k, p in model.named_parameters()})
    # float64 in both; cuDNN and the CPU sum in other orders: 1e-10 relative is ~1e6 ulps.
    assert _rel(results["cuda"][0], results["cpu"][0]) < 1e-10, _rel(results["cuda"][0], results["cpu"][0])
    for key, grad in results["cpu"][1].items():
        assert _rel(results["cuda"][1][key], grad) < 1e-9, (key, _rel(results["cuda"][1][key], grad))  # longer chains of sums: 10x


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29's, for torchcodec
def test_batches_decoded_by_nvjpeg_are_the_loader_s(tiny_data):
    """The benchmark's decoding on the GPU (benchmarks.loader) makes the loader's batches.
    torchvision asks nvJPEG for no interpolated upsampling of the colour samples, which
    libjpeg (the loader's, through Pillow) interpolates: at the built-in set's sharp colour
    edges pixels differ by a few levels in colour (simulated on the CPU: 2.2 to 2.7 on average
    in RGB), hardly in brightness (0.15 to 0.18), while the crop one pixel off differs by
    about 7 and another image by about 55. Its speed, not its pixels, is what is measured."""
    from benchmarks.loader import batch_paths, decoded_batch, decoding
    from launch import data
    bundle = data.open_data(tiny_data)
    batches = data.train_batches(bundle, 4, seed=0, epoch=0)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    for index, paths in enumerate(batch_paths(bundle, 4, 3)):
        crops = next(batches)[0].float()
        decoded = decoded_batch(paths, 4 * index, torch.device("cuda"))
        assert decoded.device.type == "cuda" and decoded.dtype == torch.uint8 and decoded.shape == crops.shape
        decoded = decoded.cpu().float()
        brightness = ((decoded - crops) * luma).sum(1).abs().mean().item()
        colour = (decoded - crops).abs().mean().item()
        shifted = ((decoded[..., 1:] - crops[..., :-1]) * luma).sum(1).abs().mean().item()
        assert brightness < 1.0 and colour < 5.0 and shifted > 3 * brightness, (index, brightness, colour, shifted)
    rate = decoding(bundle, 4, 3, torch.device("cuda"))  # as the benchmark times it, in a process of its own
    assert "reason" not in rate and rate["batches"] == 3 and rate["images_per_s"] > 0, rate


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_two_towers_sharing_one_gpu_match_the_reference(autocast):
    """Both ranks on cuda:0, exchanging CUDA tensors over gloo, as a one-GPU run does."""
    _assert_towers_sharing_one_gpu_match(autocast)


def _assert_towers_sharing_one_gpu_match(autocast, compile_backend=None):
    results = run_ranks(_parity_worker, ("tower0", torch.float32, 0, autocast, "cuda", Architecture(), compile_backend),
                        backend="gloo", timeout_s=TIMEOUT_S)
    for rank, r in enumerate(results):
        if autocast:
            # On the CPU the bf16 roundings of both nets fall in the same places (test_parity's bf16
            # test). Here a tower's products have other shapes than the reference's (FC6 and FC7
            # half as wide), cuBLAS and cuDNN pick other kernels that sum in other orders, and a sum
            # rounded to bf16 may land one step (0.4 %) away. The split must then cost no more than
            # bf16 itself: |towers - ref| <= |towers - exact| + |exact - ref|, each of the two
            # about bf16's own error (the reference's against float32), hence at most twice that
            # (and never more than the CPU's tolerances would allow, were they the larger).
            bf16 = r["bf16_error"]
            for what in ("logits", "loss"):
                assert r[what] <= max(1e-3, 2 * bf16[what]), (rank, what, r[what], bf16[what])
            for key, error in r["grads"].items():
                assert error <= max(4e-2, 2 * bf16["grads"][key]), (rank, key, error, bf16["grads"][key])
        else:
            # float32 with TF32 off: cuDNN picks other algorithms for the towers' convolutions
            # than for the grouped ones of the reference; 1e-5 relative as on the CPU, 10x for gradients.
            # Compiled, the fused kernels sum LRN's window and the bias-and-ReLU in other orders:
            # float32 reordering, within the same tolerances.
            assert r["logits"] < 1e-5 and r["loss"] < 1e-5, (rank, r["logits"], r["loss"])
            worst = max(r["grads"], key=r["grads"].get)
            assert r["grads"][worst] < 1e-4, (rank, worst, r["grads"][worst])
        assert r["exchanges"]["conv3_input/forward"]["sent_bytes"] == (2 if autocast else 4) * BATCH * 128 * 13 * 13
        if compile_backend:
            assert r["compiled_graphs"] == len(Tower.BLOCKS) and r["graph_breaks"] == 0, rank


def test_the_program_trains_on_the_gpu_and_its_checkpoint_evaluates_on_the_cpu(tiny_data, tmp_path):
    run = launch("--data", tiny_data, "--out", tmp_path, "--run-name", "gpu", "--max-steps", "3", "--val-limit", "6",
                 *TINY)
    assert "tower 0 on cuda:0, tower 1 on cuda:0" in run.stderr or "tower 0 on cuda:0, tower 1 on cuda:1" in run.stderr
    summary = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["steps"] == 3
    assert summary["input_bytes_per_step"] == 8 + 4 * 3 * 224 * 224 + 4 * 8  # count, uint8 crops, int64 labels
    on_cpu = launch("--data", tiny_data, "--out", tmp_path, "--run-name", "cpu", "--eval-only", tmp_path / "gpu",
                    "--backend", "gloo", "--val-limit", "6", "--no-ten-crop", "--workers", "0")
    assert "tower 0 on cpu" in on_cpu.stderr
    # The same predictions on the CPU, but for one image of the 6: the GPU run evaluated with
    # cuDNN's TF32 convolutions (torch's default there; 1e-3 relative), the CPU in float32, and
    # after 3 steps from the paper's initialisation two classes' logits may lie closer than that.
    on_gpu = summary["centre"]["top1_error"]
    found = re.search(r"validation top-1 error ([0-9.]+)%", on_cpu.stderr)
    assert found and abs(float(found[1]) / 100 - on_gpu) <= 1 / 6 + 1e-4, (found and found[0], on_gpu)
    model = load_reference(tmp_path / "gpu").eval()  # and in the single-device reference
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _towers_over_nccl_with_a_host_id_each(rank, *args):
    # NCCL refuses two ranks on one GPU ("Duplicate GPU detected") unless each rank takes
    # itself for another host, and then talks over its socket transport. Test-only: the
    # program never runs NCCL this way. NCCL reads the id when the first collective
    # creates its communicator, which is after this line.
    os.environ["NCCL_HOSTID"] = f"tower-{rank}"
    os.environ["NCCL_IB_DISABLE"] = "1"  # between "hosts", the socket transport even where InfiniBand is,
    os.environ["NCCL_NET"] = "Socket"  # not a network plugin of the machine's (AWS-OFI, SHARP) either,
    os.environ["NCCL_MNNVL_ENABLE"] = "0"  # nor NVLink across hosts, on a machine of an NVLink fabric
    return _parity_worker(rank, *args)


def test_two_towers_on_one_gpu_over_nccl_match_the_reference():
    # The case takes seconds when NCCL accepts the ranks; a refusal or a hang fails within 90 s.
    # Before the compiled cases, the slowest: on a machine lent for a fixed time, they are cut first.
    results = run_ranks(_towers_over_nccl_with_a_host_id_each, ("tower0", torch.float32, 0, False, "cuda"),
                        backend="nccl", timeout_s=90, collective_timeout_s=45)
    for rank, r in enumerate(results):  # float32, TF32 off: the tolerances of the gloo case above
        assert r["logits"] < 1e-5 and r["loss"] < 1e-5, (rank, r["logits"], r["loss"])
        assert max(r["grads"].values()) < 1e-4, (rank, r["grads"])
        assert r["exchanges"]["conv3_input/forward"]["sent_bytes"] == 4 * BATCH * 128 * 13 * 13


def test_two_towers_sharing_one_gpu_compiled_by_inductor_match_the_reference():
    """The towers' blocks compiled by inductor (towers.compile_blocks: generated Triton kernels),
    the exchanges between them: float32's tolerances, no graph break."""
    _needs_inductor()
    _assert_towers_sharing_one_gpu_match(autocast=False, compile_backend="inductor")


def test_the_single_layout_trains_on_the_gpu_in_bf16_compiled_and_goes_on_as_towers_on_the_cpu(tiny_data, tmp_path):
    """--layout single on the GPU in the program's fastest arithmetic (bf16 autocast, compiled
    by inductor); its checkpoint resumes as the two towers on the CPU, eager, in float32."""
    _needs_inductor()
    # --val-limit 4: one batch of 4 to evaluate, one compilation (a last batch of 2 would make another)
    run = launch("--data", tiny_data, "--out", tmp_path, "--run-name", "single", "--layout", "single", "--max-steps", "3",
                 "--val-limit", "4", "--precision", "bf16", "--compile", "inductor", *TINY)
    assert "the whole net on cuda:0, one process" in run.stderr
    summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["steps"] == 3
    assert (summary["precision"], summary["compile"], summary["layout"]) == ("bf16", "inductor", "single")
    assert summary["compiled_graphs"] >= 1 and summary["graph_breaks"] == 0, summary  # the whole net, unbroken
    # a plain --resume goes on as the run went (single, bf16): the towers and float32 are asked for
    resumed = launch("--resume", tmp_path / "single", "--layout", "towers", "--precision", "fp32", "--backend", "gloo",
                     "--max-steps", "4", "--no-ten-crop", "--workers", "0")
    assert "tower 0 on cpu" in resumed.stderr and "arithmetic: float32, eager" in resumed.stderr
    assert json.loads((tmp_path / "single" / "summary.json").read_text())["steps"] == 4
