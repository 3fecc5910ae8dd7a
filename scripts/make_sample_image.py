"""Draw samkit's sample photo, ``examples/sample.png``, and its ground truth.

A generated scene (no third-party pixels, so it can ship with the package under CC0): a
shaded ball with its shadow and a box on a textured floor before a wall. Deterministic, so the
committed files can be checked against a fresh run.

    python scripts/make_sample_image.py [--out examples]

Writes ``sample.png`` (640 x 480 RGB) and ``sample_ball.png`` (the ball's mask, 0/255).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT = 640, 480
HORIZON = 300
BALL_CENTRE, BALL_RADIUS = (250, 290), 95


def smooth_noise(rng: np.random.Generator, cells: tuple[int, int], amplitude: float) -> np.ndarray:
    """Low-frequency texture: random values on a coarse grid, resized smoothly to the image."""
    coarse = rng.normal(0.0, amplitude, size=cells).astype(np.float32)
    return cv2.resize(coarse, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)


def draw() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.arange(HEIGHT, dtype=np.float32)[:, None]
    image = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    wall = np.array([200, 196, 186], np.float32) - 0.08 * y[..., None]
    floor = np.array([150, 110, 70], np.float32) + 0.12 * (y[..., None] - HORIZON)
    image[:] = np.where(y[..., None] < HORIZON, wall, floor)
    image += (smooth_noise(rng, (24, 32), 6.0) + smooth_noise(rng, (120, 160), 3.0))[..., None]
    grain = rng.normal(0.0, 2.0, size=(HEIGHT, WIDTH, 1)).astype(np.float32)
    image += grain

    # A box on the floor, right of the ball: front face and a darker top.
    cv2.rectangle(image, (430, 250), (580, 400), (60, 90, 150), thickness=-1)
    top = np.array([[430, 250], [470, 215], [620, 215], [580, 250]], np.int32)
    cv2.fillPoly(image, [top], (90, 125, 185))
    side = np.array([[580, 250], [620, 215], [620, 365], [580, 400]], np.int32)
    cv2.fillPoly(image, [side], (45, 70, 120))

    # The ball's shadow, then the ball: a red sphere lit from the upper left.
    shadow = np.zeros((HEIGHT, WIDTH), np.float32)
    cx, cy = BALL_CENTRE
    cv2.ellipse(shadow, (cx + 40, cy + BALL_RADIUS - 8), (110, 22), 0, 0, 360, 1.0, -1)
    shadow = cv2.GaussianBlur(shadow, (0, 0), 9)
    image *= (1.0 - 0.45 * shadow)[..., None]
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    dx, dy = (xx - cx) / BALL_RADIUS, (yy - cy) / BALL_RADIUS
    inside = dx**2 + dy**2 <= 1.0
    dz = np.sqrt(np.clip(1.0 - dx**2 - dy**2, 0.0, 1.0))
    light = np.array([-0.5, -0.6, 0.62], np.float32)
    light /= np.linalg.norm(light)
    lambert = np.clip(dx * light[0] + dy * light[1] + dz * light[2], 0.0, 1.0)
    shade = 0.25 + 0.75 * lambert
    highlight = np.clip(lambert, 0, 1) ** 40
    ball = np.array([205, 35, 30], np.float32) * shade[..., None] + 255 * highlight[..., None]
    image[inside] = ball[inside]
    pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return pixels, inside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples"))
    args = parser.parse_args()
    pixels, ball = draw()
    args.out.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out / "sample.png"), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(args.out / "sample_ball.png"), ball.astype(np.uint8) * 255)
    ys, xs = np.nonzero(ball)
    print(f"wrote {args.out}/sample.png; ball box {xs.min()},{ys.min()},{xs.max()},{ys.max()}")


if __name__ == "__main__":
    main()
