"""Canny reference maps: OpenCV's edges of real photos, which deskgen's Rust Canny must match.

Used by make_fixtures.py (stage `canny`); see onnx/fixtures/README.md.

ControlNet's "canny" control images are `cv2.Canny(rgb_uint8_hwc, low, high)` on the RGB photo
(diffusers' examples, controlnet_aux). For each darknet photo (assets/testdata/darknet, fetched by
`make testdata`) and each threshold pair, this writes OpenCV's map of the photo's top-left crop of at
most CROP x CROP pixels (a crop is exact in both languages; a resize would need bit-identical
resampling) as a 1-channel PNG, 255 on edges:

  onnx/fixtures/reference/canny/<photo>_<low>_<high>.png

JPEG decoders disagree by a few levels on some pixels (PIL's libjpeg-turbo and the Rust image crate
do), which moves some edges. So one more input takes the decoder out: PIL's decoding of the dog
photo's top-left EXACT_CROP x EXACT_CROP pixels, stored losslessly as dog_rgb_<size>.png, with its
maps dog_rgb_<size>_<low>_<high>.png. cases.json lists every case: the photo and its sha256, the
file that is decoded (`input`), the crop, the sha256 of the cropped RGB bytes as PIL decoded them,
thresholds, the map, the OpenCV version and the edge-pixel count.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import pathlib

import cv2
import numpy as np
from PIL import Image

PHOTOS = ["dog", "horses", "person"]
THRESHOLDS = [(100, 200), (50, 150)]
CROP = 384
EXACT_PHOTO = "dog"
EXACT_CROP = 128


def decoded_crop(path: pathlib.Path, size: int) -> np.ndarray:
    """The top-left crop of at most size x size pixels of the RGB image as PIL decodes it."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(rgb[:size, :size])


def cases_for(repo: pathlib.Path, out: pathlib.Path, photo: pathlib.Path, source: pathlib.Path,
              stem: str) -> list[dict]:
    """Writes OpenCV's maps of the top-left CROP x CROP crop of `source` (`photo` or a decoding of
    it) and describes them."""
    crop = decoded_crop(source, CROP)
    cases = []
    for low, high in THRESHOLDS:
        edges = cv2.Canny(crop, low, high)
        file = f"{stem}_{low}_{high}.png"
        Image.fromarray(edges, mode="L").save(out / file, optimize=True)
        cases.append({
            "photo": str(photo.relative_to(repo)),
            "photo_sha256": hashlib.sha256(photo.read_bytes()).hexdigest(),
            "input": str(source.relative_to(repo)),
            "crop": {"x": 0, "y": 0, "width": crop.shape[1], "height": crop.shape[0]},
            "crop_rgb_sha256": hashlib.sha256(crop.tobytes()).hexdigest(),
            "low_threshold": low,
            "high_threshold": high,
            "file": file,
            "opencv": cv2.__version__,
            "edge_pixels": int(np.count_nonzero(edges)),
        })
    return cases


def build(repo: pathlib.Path, out: pathlib.Path) -> None:
    """Writes the maps and cases.json under `out` (fixtures/reference/canny)."""
    photos = repo / "assets" / "testdata" / "darknet"
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for name in PHOTOS:
        photo = photos / f"{name}.jpg"
        if not photo.is_file():
            raise SystemExit(f"{photo} is missing: run `make testdata` (onnx/fetch_testdata.sh)")
        cases += cases_for(repo, out, photo, photo, name)
    photo = photos / f"{EXACT_PHOTO}.jpg"
    stem = f"{EXACT_PHOTO}_rgb_{EXACT_CROP}"
    Image.fromarray(decoded_crop(photo, EXACT_CROP)).save(out / f"{stem}.png", optimize=True)
    cases += cases_for(repo, out, photo, out / f"{stem}.png", stem)
    doc = {
        "call": "cv2.Canny(rgb_uint8_hwc, low_threshold, high_threshold)  # apertureSize=3, L2gradient=False",
        "input": "Image.open(input).convert('RGB'), top-left crop",
        "package": f"opencv-python-headless=={importlib.metadata.version('opencv-python-headless')}",
        "cases": cases,
    }
    (out / "cases.json").write_text(json.dumps(doc, indent=2) + "\n")
