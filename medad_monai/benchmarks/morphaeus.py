"""MorphAEus: ours (the bundle's network, loss and optimizer) against the original code's computation.

The reference is :class:`~medad_monai.benchmarks.morphaeus_reference.OriginalMorphAEus` on a copy of the same
initial weights. Targets (issue 12, the paper configuration): train step >= 2.5x and inference >= 2x the reference's
throughput at batch 1 and N, at equal outputs.
"""

from __future__ import annotations

import copy
import warnings

import torch

from medad_monai.benchmarks.bundle_config import bundle_parser, parsed
from medad_monai.benchmarks.folder_inference import add_folder_inference
from medad_monai.benchmarks.morphaeus_reference import OriginalMorphAEus
from medad_monai.benchmarks.report import Row, Section
from medad_monai.benchmarks.timing import interleaved_times, optimizer_step, peak_memory, repeat_calls, repeated, train_step_times
from medad_monai.networks import AnomalyMapNet

__all__ = ["morphaeus_section"]

TRAIN_SPEEDUP_TARGET = 2.5
INFERENCE_SPEEDUP_TARGET = 2.0


def morphaeus_section(
    configuration: str,
    batch_size: int | None = None,
    reps: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    min_call_seconds: float = 0.3,
    seed: int = 0,
    folder_images: int = 0,
    folder_reps: int | None = None,
) -> Section:
    """Times one MorphAEus configuration against the original-math reference.

    Args:
        configuration: ``"paper"`` (``train.json``) or ``"demo"`` (+ ``demo.json``).
        batch_size: training and "batch N" inference batch; None = the config's ``batch_size``.
        reps: interleaved timed repetitions (medians are reported).
        warmup: untimed calls of each candidate first.
        device: where to run.
        min_call_seconds: short calls (inference at batch 1) are repeated to last about this long per repetition.
        seed: seed of the weights and of the input batch.
        folder_images: also time the bundle's inference job end to end on a folder of this many images
            (:mod:`~medad_monai.benchmarks.folder_inference`); 0 skips it.
        folder_reps: timed runs of each folder job, without warm-up; None = ``reps`` after ``warmup``.

    Returns:
        A :class:`~medad_monai.benchmarks.report.Section` with train-step time, its peak memory and FLOPs, and
        inference time per image at batch 1 and N; its notes give the output and loss differences on equal weights.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM.*VGG.*")  # no VGG weights offline: random is fine here
        tp = bundle_parser("morphaeus", "train.json", configuration, device, {"allow_random_vgg": True})
        net = tp.get_parsed_content("network")
        loss = tp.get_parsed_content("loss")
        opt = tp.get_parsed_content("optimizer")
    cfg = parsed(tp, ["spatial_size", "channels", "batch_size", "warmup_epochs", "learning_rate"])
    batch = int(batch_size or cfg["batch_size"])
    loss.set_epoch(int(cfg["warmup_epochs"]) + 2)  # after the warm-up: every loss term on
    ref = OriginalMorphAEus(copy.deepcopy(net), loss).to(device)
    ref_opt = torch.optim.Adam(ref.network.parameters(), lr=float(cfg["learning_rate"]))  # original: Adam(lr 5e-4)
    ip = bundle_parser("morphaeus", "inference.json", configuration, device)
    inet = ip.get_parsed_content("network")
    inet.load_state_dict(net.state_dict())

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, int(cfg["channels"]), *cfg["spatial_size"], generator=g).to(device)
    x1 = x[:1].clone()

    size = "x".join(str(s) for s in cfg["spatial_size"])
    title = (
        f"MorphAEus {configuration} ({'train.json' if configuration == 'paper' else 'train.json + demo.json'}): "
        f"{cfg['channels']}x{size}, batch {batch}, perceptual weight {loss.perceptual_weight:g}; "
        "reference = the original code's computation"
    )
    section = Section(title)
    section.notes += _equality_notes(net, ref, loss, inet, x[:2])
    paper = configuration == "paper"

    # ------------------------------------------------------------------------------------------------ inference
    net.eval()
    ref.eval()
    inet.eval()

    def ours_infer(xb: torch.Tensor):
        with torch.no_grad():  # as medad_monai.engine.evaluator.AnomalyEvaluator calls the network
            return inet.predict(xb)

    def ref_infer(xb: torch.Tensor):
        with torch.no_grad():  # the original evaluator: model(x), map |x_rec - x|
            rec = ref(xb).reconstruction
            return rec, (xb - rec).abs()

    for label, xb in (("inference, batch 1", x1), (f"inference, batch {batch}", x)):
        ours_call, n = repeat_calls(lambda xb=xb: ours_infer(xb), min_call_seconds)
        ref_call = repeated(lambda xb=xb: ref_infer(xb), n)
        t = interleaved_times({"ref": ref_call, "ours": ours_call}, reps, warmup, device)
        per_image = n * xb.shape[0]
        section.rows.append(
            Row(
                f"{label} [per image]",
                "ms",
                t["ref"]["median"] / per_image,
                t["ours"]["median"] / per_image,
                min_speedup=INFERENCE_SPEEDUP_TARGET if paper else None,
                target_text=f">= {INFERENCE_SPEEDUP_TARGET:g}x" if paper else "",
                samples={
                    "reference": [v / per_image for v in t["ref"]["times"]],
                    "ours": [v / per_image for v in t["ours"]["times"]],
                },
                why=(
                    "the arithmetic is the original's (same network, same FLOPs); what differs is the memory layout "
                    "(channels-last convolutions), fused Swish and the skipped reversed warp. At batch 1 the 19 "
                    "convolutions are two thirds of our time (torch profiler, paper size, idle machine: 6.8 of 10.5 "
                    "ms; the reference's 9.9 of 17.1 ms), and channels-last gains only about 1.5x on tensors this "
                    "small; the rest (Swish, BatchNorm, warps) is already 1.9x faster."
                ),
            )
        )

    if folder_images:
        add_folder_inference(
            section, "morphaeus", configuration, net.state_dict(), folder_images,
            reps if folder_reps is None else folder_reps, warmup if folder_reps is None else 0, device, paper,
        )

    # ------------------------------------------------------------------------------------------------ training
    net.train()
    ref.train()

    ours_step, ref_step = optimizer_step(net, loss, opt), optimizer_step(ref, ref.loss, ref_opt)
    t, ref_flops, our_flops = train_step_times(ours_step, ref_step, x, x1, reps, warmup, device)
    flops = Row("train step FLOPs (counted at batch 1, x batch)", "GFLOP", ref_flops, our_flops)
    vgg = (
        "ours keeps the loss's three VGG19 passes per step (prior, target without a graph, backward to the prior), "
        "the bulk of its time (already channels-last)"
        if loss.perceptual is not None
        else "no perceptual term in this configuration"
    )
    section.rows.append(
        Row(
            "train step (fwd + bwd + optimizer), bundle loss",
            "s",
            t["ref"]["median"],
            t["ours"]["median"],
            min_speedup=TRAIN_SPEEDUP_TARGET if paper else None,
            target_text=f">= {TRAIN_SPEEDUP_TARGET:g}x" if paper else "",
            samples={"reference": t["ref"]["times"], "ours": t["ours"]["times"]},
            why=(
                f"the reference does {flops.speedup or 0:.2f}x our arithmetic (FLOP row: the VGG weight gradients and "
                f"the target's graph), so at equal efficiency that is the speed-up; {vgg}."
            ),
        )
    )
    section.rows.append(
        Row(
            "train step peak memory",
            "GiB",
            peak_memory(lambda: ref_step(x), device),
            peak_memory(lambda: ours_step(x), device),
        )
    )
    section.rows.append(flops)
    return section


def _equality_notes(net, ref: OriginalMorphAEus, loss, inet, x: torch.Tensor) -> list[str]:
    """Outputs and loss terms of ours and of the reference on the same weights (before any timed step)."""
    was_training = net.training
    with torch.no_grad():
        ours, theirs = net(x), ref(x)
        out_diff = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
        # the config's map recipe (residual, smoothing) on both reconstructions; before the healthy normalisation,
        # whose statistics only a calibration fits (a per-pixel function of this map)
        map_ours = inet.unnormalized_predict(x)[1]
        ref_maps = AnomalyMapNet(
            ref, residual=inet.residual, smooth_sigma=inet.smooth_sigma, map_residual=inet.map_residual
        )
        map_ref = ref_maps.unnormalized_predict(x)[1]
        map_diff = float((map_ours - map_ref).abs().max())
        total_ours = float(loss(ours, x))
        total_ref = float(ref.loss(theirs, x))
    net.train(was_training)
    t_ours, t_ref = loss.last_terms, ref.last_terms
    terms = ", ".join(
        f"{k} {t_ours[k]:.6g} vs {t_ref[k]:.6g}"
        for k in ("mse", "perceptual", "ncc", "reg")
        if k in t_ours and k in t_ref
    )
    return [
        f"equal weights: outputs max|ours - reference| = {out_diff:.1e}, anomaly maps {map_diff:.1e} (the config's "
        f"{inet.map_residual} residual, sigma {inet.smooth_sigma:g}, before the healthy normalisation)",
        f"loss ours {total_ours:.6g} vs reference {total_ref:.6g} ({terms}); the NCC differs only by its stabiliser in "
        "windows without contrast (MONAI's variance floor vs the original's +1e-5)",
    ]
