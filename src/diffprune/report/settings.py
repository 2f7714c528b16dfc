"""The "Settings" section: how every input was made (prune, training, evaluation, sampling
settings), the library versions each input recorded, and the input paths themselves."""

from __future__ import annotations

from pathlib import Path

from .document import Section, Table, ranges_text, seconds_text, settings_table
from .inputs import INPUT_LABELS, SAMPLE_CONFIG, Inputs, Samples, lookup
from .tables import clip_model


def settings_section(inputs: Inputs, teacher: Samples | None, student: Samples | None, given: dict) -> Section:
    from .. import __version__

    sec = Section("Settings")
    pr = inputs.data.get("prune")
    if pr is not None:
        sec.blocks += ["Pruning (prune report):", _prune_table(pr)]
    fc = inputs.data.get("finetune_config")
    if fc is not None:
        sec.blocks.append(f"Training ({inputs.files['finetune_config'].name}):")
        sec.blocks.append(settings_table([(k, v) for k, v in fc.items()]))
    for name in ("evaluation", "teacher_evaluation"):
        if inputs.data.get(name) is not None:
            sec.blocks.append(f"{INPUT_LABELS[name].capitalize()} ({inputs.files[name].name}):")
            sec.blocks.append(_evaluation_table(inputs, name))
    for who, s in (("teacher", teacher), ("student", student)):
        if s is not None and s.config:
            sec.blocks.append(f"Sampling, {who} ({s.folder / SAMPLE_CONFIG}):")
            sec.blocks.append(settings_table([(k, v) for k, v in s.config.items()]))
    versions = [("report written by diffprune", __version__)]
    for name in ("prune", "evaluation", "teacher_evaluation"):
        v = inputs.get(name, "versions")
        if isinstance(v, dict):
            versions += [(f"{INPUT_LABELS[name]}: {k}", val) for k, val in v.items()]
    sec.blocks += ["Versions:", settings_table(versions), "Inputs:",
                   settings_table([(k.replace("_", "-"), str(Path(v).absolute())) for k, v in given.items()])]
    return sec


def _prune_table(pr: dict) -> Table:
    cfg, imp = pr.get("config") or {}, pr.get("importance") or {}
    return settings_table([
        ("model", cfg.get("model")), ("family", pr.get("family")), ("method", cfg.get("method", imp.get("method"))),
        ("threshold", imp.get("threshold")), ("ratio (applied)", pr.get("ratio")),
        ("ratio rule", cfg.get("ratio_rule")), ("allocation", lookup(pr, "allocation.mode") or cfg.get("allocation")),
        ("estimator", pr.get("estimator") or cfg.get("estimator")), ("target MACs", cfg.get("target_macs")),
        ("target params", cfg.get("target_params")), ("round to", cfg.get("round_to")),
        ("calibration data", cfg.get("data")), ("calibration images", lookup(pr, "calibration.images")),
        ("kept timesteps", ranges_text(imp.get("kept_timesteps", [])) if "kept_timesteps" in imp else None),
        ("number of kept timesteps", imp.get("num_kept_timesteps")), ("cut timestep", imp.get("cut_timestep")),
        ("sample-gradient evaluations", imp.get("sample_gradient_evals")),
        ("wall time", seconds_text(pr.get("wall_time_s"))), ("seed", cfg.get("seed")), ("device", cfg.get("device")),
    ])


def _evaluation_table(inputs: Inputs, name: str) -> Table:
    ev = inputs.data[name]
    c = ev.get("config") or {}
    return settings_table([
        ("samples", lookup(ev, "samples.path") or c.get("samples")), ("reference", c.get("reference")),
        ("feature net", lookup(ev, "fid.feature_extractor") or c.get("feature_net")),
        ("KID subsets x size", f"{c['kid_subsets']} x {c['kid_subset_size']}" if "kid_subsets" in c else None),
        ("CLIP model", clip_model(inputs, name)),
        ("teacher samples", c.get("teacher_samples")), ("model", c.get("model")),
        ("teacher model", c.get("teacher_model")),
        ("latency settings", lookup(ev, "cost.latency.settings")),
        ("MACs protocol", lookup(ev, "cost.macs_protocol")), ("seed", c.get("seed")),
    ])
