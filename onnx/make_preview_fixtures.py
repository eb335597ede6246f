"""Preview decoder fixture: a tiny random TAESD-style decoder (diffusers' AutoencoderTiny) in ONNX,
and what diffusers decodes from a fixed set of latents with it.

Used by make_fixtures.py (stage `preview`); see onnx/fixtures/README.md.

Layout: onnx/fixtures/tiny-taesd/model.onnx, input `latent_sample` [batch, 4, h, w] (latents in the
UNet's space, as diffusers feeds AutoencoderTiny: its scaling factor is 1), output `sample`
[batch, 3, 8h, 8w] in [-1, 1]. Reference: reference/preview/latents.npy and image.npy, the output of
`AutoencoderTiny.decode(latents).sample` in torch.
"""
from __future__ import annotations

import pathlib

import numpy as np
import torch


def build(out: pathlib.Path, ref: pathlib.Path, save_npy) -> float:
    """Exports the tiny decoder to `out`, writes the reference under `ref`; returns ORT's largest
    difference from torch on the reference latents."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    model = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    ).eval()

    class Decode(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample):
            return self.vae.decode(latent_sample).sample

    generator = torch.Generator().manual_seed(7)
    latents = torch.randn((1, 4, 8, 12), generator=generator) * 1.5
    with torch.no_grad():
        image = model.decode(latents).sample
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    torch.onnx.export(
        Decode(model),
        (latents,),
        str(path),
        input_names=["latent_sample"],
        output_names=["sample"],
        dynamic_axes={"latent_sample": {0: "batch", 2: "height", 3: "width"},
                      "sample": {0: "batch", 2: "image_height", 3: "image_width"}},
        opset_version=17,
        dynamo=False,
    )
    ref.mkdir(parents=True, exist_ok=True)
    save_npy(ref / "latents.npy", latents.numpy())
    save_npy(ref / "image.npy", image.numpy())

    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"latent_sample": latents.numpy()})[0]
    return float(np.abs(got - image.numpy()).max())
