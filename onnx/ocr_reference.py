"""Reference outputs of the PP-OCRv4 text reader for tests/vision.rs: what rapidocr-onnxruntime's
own pipeline (text detection with DB post-processing, the 0/180 orientation classifier, CTC
recognition) reads from images with text of known strings on them.

    onnx/make_ocr_reference.sh    (runs this in its own venv, with the wheel's three ONNX files)

No darknet photo has legible text of its own, so the strings are rendered: straight, tilted and
upside down, onto four darknet photos (onnx/fetch_testdata.sh) and onto two clean white pages,
in Pillow's built-in scalable font (Aileron), dark or light after the photo under them, with an
outline of the other. Writes onnx/fixtures/reference/ocr/:
  <name>.png    the image, exactly as both pipelines read it
  cases.json    per image: the rendered strings with their upright boxes, and rapidocr's lines
                ({text, score, box: four [x, y] corners}) in its order
"""
from __future__ import annotations

import json
import pathlib
import sys

from PIL import Image, ImageDraw, ImageFont, ImageStat

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "onnx/fixtures/reference/ocr"
PHOTOS = ROOT / "assets/testdata/darknet"

# (string, x, y, font size, degrees counter-clockwise)
PAGES = {
    "dog-logitech": ("dog.jpg", [
        ("Logitech", 60, 40, 40, 0),
        ("MX Keys S", 440, 60, 30, 0),
        ("DELL U2720Q", 470, 500, 28, 0),
        ("Samsung", 300, 300, 34, 6),
    ]),
    "person-brands": ("person.jpg", [
        ("ABKO K660", 20, 20, 30, 0),
        ("Apple", 460, 30, 36, 0),
        ("LG 27GP850", 330, 370, 26, 0),
        ("USB-C 65W", 30, 350, 24, -5),
    ]),
    "horses-models": ("horses.jpg", [
        ("Keychron K2", 40, 30, 32, 0),
        ("Razer", 560, 40, 40, 0),
        ("BenQ ScreenBar", 420, 450, 28, 0),
        ("Sony WH-1000XM5", 60, 455, 26, 180),
    ]),
    "kite-labels": ("kite.jpg", [
        ("Philips Hue", 60, 60, 42, 0),
        ("HyperX", 700, 90, 46, 0),
        ("Model 2024-B", 560, 560, 36, 4),
        ("Logitech G502", 60, 590, 38, 0),
    ]),
    "page-specs": (None, [
        ("Dell UltraSharp 27", 30, 30, 36, 0),
        ("Logitech MX Master 3S", 30, 100, 30, 0),
        ("Samsung Odyssey G5", 30, 160, 30, 0),
        ("1920x1080 60Hz", 30, 220, 26, 0),
    ]),
    "page-small": (None, [
        ("ASUS ROG", 20, 20, 22, 0),
        ("Apple MacBook Air", 20, 70, 20, 0),
        ("LG gram 16", 20, 120, 20, 0),
        ("Anker 737", 260, 20, 24, 0),
    ]),
}
PAGE_SIZES = {"page-specs": (640, 280), "page-small": (420, 160)}
# Photos wider than this are scaled down to it first (kite.jpg, 1352 px), as a phone photo would be.
MAX_WIDTH = 1024


def render(base: Image.Image, strings):
    """Draws each string onto `base` (in place); returns their upright boxes [x0, y0, x1, y1]."""
    boxes = []
    for text, x, y, size, degrees in strings:
        font = ImageFont.load_default(size=size)
        left, top, right, bottom = font.getbbox(text, stroke_width=2)
        layer = Image.new("RGBA", (right - left + 8, bottom - top + 8), (0, 0, 0, 0))
        region = base.crop((x, y, x + layer.width, y + layer.height)).convert("L")
        dark = ImageStat.Stat(region).mean[0] > 110
        fill, stroke = ((20, 20, 20, 255), (245, 245, 245, 255)) if dark else ((250, 250, 250, 255), (15, 15, 15, 255))
        ImageDraw.Draw(layer).text((4 - left, 4 - top), text, font=font, fill=fill, stroke_width=2, stroke_fill=stroke)
        if degrees:
            layer = layer.rotate(degrees, resample=Image.BICUBIC, expand=True)
        base.alpha_composite(layer, (x, y))
        boxes.append([x, y, x + layer.width, y + layer.height])
    return boxes


def main(models: pathlib.Path):
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR(
        det_model_path=str(models / "ocr_det.onnx"),
        cls_model_path=str(models / "ocr_cls.onnx"),
        rec_model_path=str(models / "ocr_rec.onnx"),
        intra_op_num_threads=1,
        inter_op_num_threads=1,
    )
    OUT.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, (photo, strings) in PAGES.items():
        if photo:
            base = Image.open(PHOTOS / photo).convert("RGBA")
            if base.width > MAX_WIDTH:
                base = base.resize((MAX_WIDTH, round(base.height * MAX_WIDTH / base.width)), Image.LANCZOS)
        else:
            base = Image.new("RGBA", PAGE_SIZES[name], (255, 255, 255, 255))
        boxes = render(base, strings)
        path = OUT / f"{name}.png"
        base.convert("RGB").save(path, optimize=True)
        result, _ = engine(str(path))
        lines = [
            {"text": text, "score": round(float(score), 5), "box": [[round(float(v), 2) for v in p] for p in box]}
            for box, text, score in (result or [])
        ]
        cases.append({
            "image": path.name,
            "strings": [{"text": s[0], "box": b, "degrees": s[4]} for s, b in zip(strings, boxes)],
            "lines": lines,
        })
        print(f"{name}: {[line['text'] for line in lines]}", file=sys.stderr)
    with open(OUT / "cases.json", "w") as out:
        out.write("[\n")
        for i, case in enumerate(cases):
            out.write(f' {{"image": {json.dumps(case["image"])},\n  "strings": [\n')
            out.write(",\n".join(f"   {json.dumps(s)}" for s in case["strings"]))
            out.write('\n  ],\n  "lines": [\n')
            out.write(",\n".join(f"   {json.dumps(line, ensure_ascii=False)}" for line in case["lines"]))
            out.write("\n  ]}" + (",\n" if i + 1 < len(cases) else "\n"))
        out.write("]\n")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
