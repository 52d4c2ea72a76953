"""Regenerate the small calibration set (deterministic): uv run python examples/calib/make_calib.py

Four 224x224 RGB JPEGs with smooth gradients, shapes and noise: enough variety
for int8 calibration of the example models (whose weights are constant fills,
so the images' content matters less than their value range).
"""

from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent


def make_image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:224, 0:224].astype(np.float32) / 223.0
    channels = [np.sin((x * rng.uniform(1, 6) + y * rng.uniform(1, 6)) * np.pi + rng.uniform(0, 6)) for _ in range(3)]
    image = (np.stack(channels, axis=-1) * 0.5 + 0.5) * 255.0
    for _ in range(4):
        center = tuple(int(v) for v in rng.integers(20, 204, size=2))
        color = tuple(int(v) for v in rng.integers(0, 256, size=3))
        cv2.circle(image, center, int(rng.integers(10, 50)), color, -1)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def main() -> None:
    names = []
    for seed in range(4):
        name = f"sample_{seed}.jpg"
        cv2.imwrite(str(HERE / name), make_image(seed), [cv2.IMWRITE_JPEG_QUALITY, 85])
        names.append(name)
    (HERE / "inception_v2.txt").write_text("".join(f"{n}\n" for n in names))


if __name__ == "__main__":
    main()
