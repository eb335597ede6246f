#!/usr/bin/env python3
"""Export ControlNets and the UNet that takes their residuals to ONNX, in the layout deskgen loads.

    OUT_DIR/controlnet/<type>/model.onnx   one per control type
    OUT_DIR/controlnet/<type>/config.json  the ControlNet's diffusers config, plus "control_type"
    OUT_DIR/unet_controlnet/model.onnx     the pipeline's UNet with residual inputs

A ControlNet takes `sample`, `timestep` (rank-0 float32), `encoder_hidden_states`, `controlnet_cond`
([batch, 3, H, W] in [0, 1]) and for SDXL `text_embeds` and `time_ids`; it returns
`down_block_res_sample_0..N-1` and `mid_block_res_sample`, unscaled (conditioning scale 1: deskgen
multiplies by the request's scale). The residual UNet takes the plain UNet's inputs plus
`down_block_additional_residual_0..N-1` and `mid_block_additional_residual` and returns
`out_sample`; the plain `unet/` stays for requests without control. This is the layout of ONNX
Runtime's and TensorRT's Stable Diffusion ControlNet pipelines.

Usage: export_controlnet.py PIPELINE_DIR_OR_ID OUT_DIR TYPE=CONTROLNET_DIR_OR_ID [TYPE=...]
(called by export_sd.sh --controlnet; the fixtures call the functions directly).
"""
from __future__ import annotations

import argparse
import json
import pathlib

import torch

OPSET = 18


class ControlNetResiduals(torch.nn.Module):
    """A ControlNet as a graph with named tensor outputs and no conditioning scale."""

    def __init__(self, controlnet, size_conditioned: bool):
        super().__init__()
        self.controlnet = controlnet
        self.size_conditioned = size_conditioned

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, *added):
        added_cond_kwargs = {"text_embeds": added[0], "time_ids": added[1]} if self.size_conditioned else None
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states, controlnet_cond,
            added_cond_kwargs=added_cond_kwargs, return_dict=False,
        )
        return (*down, mid)


class UnetWithResiduals(torch.nn.Module):
    """The UNet with ControlNet residuals as inputs after its usual ones."""

    def __init__(self, unet, size_conditioned: bool, down_count: int):
        super().__init__()
        self.unet = unet
        self.size_conditioned = size_conditioned
        self.down_count = down_count

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added_cond_kwargs = None
        if self.size_conditioned:
            added_cond_kwargs = {"text_embeds": rest[0], "time_ids": rest[1]}
            rest = rest[2:]
        down, mid = rest[: self.down_count], rest[self.down_count]
        return self.unet(
            sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
            down_block_additional_residuals=list(down), mid_block_additional_residual=mid, return_dict=False,
        )[0]


def example_inputs(unet, size_conditioned: bool):
    """Inputs at batch 2 and a 64x64 image; every axis but the channels is exported dynamic."""
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    sample = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    timestep = torch.tensor(501.0)
    hidden = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    added = ()
    if size_conditioned:
        proj = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = (torch.randn(2, proj, generator=g), torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2))
    return sample, timestep, hidden, added


def residual_shapes(controlnet, size_conditioned: bool, unet):
    sample, timestep, hidden, added = example_inputs(unet, size_conditioned)
    cond = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = ControlNetResiduals(controlnet, size_conditioned)(sample, timestep, hidden, cond, *added)
    return outs


def added_names(size_conditioned: bool) -> list[str]:
    return ["text_embeds", "time_ids"] if size_conditioned else []


def batch_axes(names: list[str], spatial: set[str]) -> dict:
    axes = {}
    for n in names:
        if n == "timestep":
            continue
        axes[n] = {0: "batch", 2: f"{n}_height", 3: f"{n}_width"} if n in spatial else {0: "batch"}
    return axes


def export_controlnet(controlnet, unet, control_type: str, out: pathlib.Path) -> int:
    """Writes out/controlnet/<type>/{model.onnx,config.json}; returns the number of down residuals."""
    xl = unet.config.addition_embed_type == "text_time"
    controlnet = controlnet.eval().float()
    sample, timestep, hidden, added = example_inputs(unet, xl)
    cond = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    outs = residual_shapes(controlnet, xl, unet)
    down_count = len(outs) - 1
    inputs = ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", *added_names(xl)]
    outputs = [f"down_block_res_sample_{i}" for i in range(down_count)] + ["mid_block_res_sample"]
    spatial = {"sample", "controlnet_cond", *outputs}
    target = out / "controlnet" / control_type
    target.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            ControlNetResiduals(controlnet, xl), (sample, timestep, hidden, cond, *added),
            str(target / "model.onnx"), input_names=inputs, output_names=outputs,
            dynamic_axes=batch_axes(inputs + outputs, spatial), opset_version=OPSET, dynamo=False,
        )
    config = dict(controlnet.config)
    config["control_type"] = control_type
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    return down_count


def export_residual_unet(unet, controlnet, out: pathlib.Path) -> None:
    """Writes out/unet_controlnet/model.onnx, shaped by `controlnet`'s residuals."""
    xl = unet.config.addition_embed_type == "text_time"
    unet = unet.eval().float()
    residuals = residual_shapes(controlnet.eval().float(), xl, unet)
    down_count = len(residuals) - 1
    sample, timestep, hidden, added = example_inputs(unet, xl)
    down_names = [f"down_block_additional_residual_{i}" for i in range(down_count)]
    inputs = ["sample", "timestep", "encoder_hidden_states", *added_names(xl), *down_names,
              "mid_block_additional_residual"]
    spatial = {"sample", "out_sample", *down_names, "mid_block_additional_residual"}
    target = out / "unet_controlnet"
    target.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            UnetWithResiduals(unet, xl, down_count), (sample, timestep, hidden, *added, *residuals),
            str(target / "model.onnx"), input_names=inputs, output_names=["out_sample"],
            dynamic_axes=batch_axes(inputs + ["out_sample"], spatial), opset_version=OPSET, dynamo=False,
        )


def main() -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    ap = argparse.ArgumentParser()
    ap.add_argument("pipeline")
    ap.add_argument("out")
    ap.add_argument("controlnets", nargs="+", metavar="TYPE=DIR_OR_ID")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    unet = UNet2DConditionModel.from_pretrained(args.pipeline, subfolder="unet")
    nets = []
    for spec in args.controlnets:
        control_type, _, source = spec.partition("=")
        if not control_type or not source:
            raise SystemExit(f"export_controlnet.py: expected TYPE=DIR_OR_ID, got {spec!r}")
        nets.append((control_type, ControlNetModel.from_pretrained(source)))
    for control_type, net in nets:
        export_controlnet(net, unet, control_type, out)
        print(f"export_controlnet.py: {control_type} -> {out / 'controlnet' / control_type}")
    export_residual_unet(unet, nets[0][1], out)
    print(f"export_controlnet.py: residual UNet -> {out / 'unet_controlnet'}")


if __name__ == "__main__":
    main()
