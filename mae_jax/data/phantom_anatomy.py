"""Anatomy of the phantom (mae_jax.data.phantom): tissue layers, organ templates, lesions, painting."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np

from mae_jax.data.phantom_geometry import _F32, CLASSES, Coords, Probe


# --------------------------------------------------------------------------------------------
# Anatomy: tissues painted in order (later layers cover earlier ones).
# --------------------------------------------------------------------------------------------

Shape = Callable[[Coords], np.ndarray]


class Layer(NamedTuple):
  name: str
  shape: Shape | None  # None = everywhere (the background)
  echo: float  # mean backscattered intensity relative to a reference soft tissue
  alpha: float  # attenuation, dB / cm / MHz


# Representative values (intensity relative to liver; attenuation from textbook tables). Each
# template jitters them per image. Fluids barely scatter or attenuate; bone and air do both a lot.
ANECHOIC = 1e-5  # blood, amniotic fluid, cysts: about -50 dB re soft tissue


def _rotated(c: Coords, cx: float, cd: float, angle: float):
  cos, sin = math.cos(angle), math.sin(angle)
  dx, dd = c.x - cx, c.d - cd
  return dx * cos + dd * sin, dd * cos - dx * sin


def ellipse(cx: float, cd: float, a: float, b: float, angle: float = 0.0) -> Shape:
  """Semi-axis a along the (rotated) lateral direction, b along depth."""

  def shape(c: Coords) -> np.ndarray:
    u, v = _rotated(c, cx, cd, angle)
    return (u * u) * (1.0 / (a * a)) + (v * v) * (1.0 / (b * b)) <= 1.0

  return shape


def band(top: Callable, bottom: Callable) -> Shape:
  """Tissue between two boundaries given as functions of x, in path depth: superficial layers
  follow the probe face (a pressed convex probe curves them)."""
  return lambda c: (c.p >= top(c.x)) & (c.p < bottom(c.x))


def wavy(rng: np.random.Generator, base: float, amp: float, period=(2.0, 6.0)) -> Callable:
  """A boundary at depth ``base`` undulating by ``amp`` (cm)."""
  k = 2 * math.pi / rng.uniform(*period)
  phase = rng.uniform(0, 2 * math.pi)
  return lambda x: base + amp * np.sin(k * x + phase)


def _body_wall(rng, spec) -> tuple[list[Layer], float]:
  """Superficial layers stacked from the probe face; spec: [(name, (tmin, tmax), echo, alpha)]."""
  layers, top, depth = [], (lambda x: -1.0), 0.0
  for name, (tmin, tmax), echo, alpha in spec:
    depth += rng.uniform(tmin, tmax)
    bottom = wavy(rng, depth, 0.15 * (tmax - tmin))
    layers.append(Layer(name, band(top, bottom), echo, alpha))
    top = bottom
  return layers, depth


def _jitter(rng, value: float, rel: float = 0.15) -> float:
  return float(value * rng.uniform(1 - rel, 1 + rel))


class Anatomy(NamedTuple):
  layers: list[Layer]
  host: tuple[float, float, float]  # lesion centre (x, d) and typical radius (cm)
  host_echo: float
  host_alpha: float
  parenchyma: str  # name of the organ's main homogeneous tissue
  tgc_alpha: float  # attenuation (dB/cm/MHz) the sonographer's TGC curve compensates


def _thyroid(rng, probe: Probe) -> Anatomy:
  """Transverse neck: skin, fat, strap muscles, two lobes joined by the isthmus over the
  trachea (air: bright anterior wall, total shadow below), carotid arteries laterally."""
  thy_echo, thy_alpha = _jitter(rng, 1.5), 0.7
  wall, depth = _body_wall(
    rng,
    [
      ("skin", (0.12, 0.2), _jitter(rng, 3.0), 0.8),
      ("fat", (0.15, 0.35), _jitter(rng, 0.4), 0.6),
      ("muscle", (0.25, 0.4), _jitter(rng, 0.4), 1.0),
    ],
  )
  tx = rng.uniform(-0.25, 0.25)
  rt = rng.uniform(0.75, 0.95)
  dt = depth + rng.uniform(0.3, 0.45)  # anterior tracheal wall, under the isthmus
  layers = [Layer("deep", None, _jitter(rng, 0.6), 0.8), *wall]
  lobes = []
  for side in (-1, 1):
    a, b = rng.uniform(0.65, 0.9), rng.uniform(0.7, 0.95)
    cx = tx + side * (rt + rng.uniform(0.35, 0.55))
    cd = dt + rng.uniform(0.6, 0.9)
    lobes.append((cx, cd, a, b))
    # Longus colli behind the lobe, carotid and jugular lateral to it.
    layers.append(
      Layer("muscle", ellipse(cx - side * 0.2, cd + b + 0.35, 0.7, 0.3), _jitter(rng, 0.45), 1.0)
    )
    layers.append(
      Layer("thyroid", ellipse(cx, cd, a, b, side * rng.uniform(0, 0.25)), thy_echo, thy_alpha)
    )
    rc = rng.uniform(0.28, 0.38)
    ccx, ccd = cx + side * (a + rc + rng.uniform(0.05, 0.2)), cd + rng.uniform(0.0, 0.3)
    layers.append(
      Layer("vessel_wall", ellipse(ccx, ccd, rc + 0.05, rc + 0.05), _jitter(rng, 3.0), 0.8)
    )
    layers.append(Layer("vessel", ellipse(ccx, ccd, rc, rc), ANECHOIC, 0.15))
    layers.append(
      Layer("vessel", ellipse(ccx + side * 0.3, ccd - rc - 0.05, 0.35, 0.15), ANECHOIC, 0.15)
    )
  layers.append(
    Layer("thyroid", ellipse(tx, dt - 0.12, rt + 0.6, rng.uniform(0.14, 0.2)), thy_echo, thy_alpha)
  )
  # Cartilage ring: a strong specular reflector; the air inside reflects and absorbs everything.
  layers.append(
    Layer("trachea_wall", ellipse(tx, dt + rt, rt + 0.08, rt + 0.08), _jitter(rng, 25.0), 3.0)
  )
  layers.append(Layer("trachea", ellipse(tx, dt + rt, rt, rt), 1e-6, 60.0))
  cx, cd, a, b = lobes[rng.integers(2)]
  host = (
    cx + rng.uniform(-0.3, 0.3) * a,
    cd + rng.uniform(-0.2, 0.2) * b,
    rng.uniform(0.3, 0.55),
  )
  return Anatomy(layers, host, thy_echo, thy_alpha, "thyroid", 0.75)


def _breast(rng, probe: Probe) -> Anatomy:
  """Skin, subcutaneous fat crossed by Cooper's ligaments, fibroglandular layer with fat
  lobules, retromammary fat, striated pectoralis muscle, chest wall (maybe a shadowing rib)."""
  gland_echo, gland_alpha = _jitter(rng, 1.5), 0.8
  fat_echo = _jitter(rng, 0.35)
  half = probe.width / 2
  t_skin = rng.uniform(0.15, 0.22)
  t_fat = wavy(rng, t_skin + rng.uniform(0.4, 0.9), rng.uniform(0.05, 0.2))
  gland_thick = rng.uniform(1.2, 1.8)
  t_gland = wavy(rng, t_fat(0.0) + gland_thick, rng.uniform(0.1, 0.3))
  retro = rng.uniform(0.2, 0.4)
  t_retro = lambda x: t_gland(x) + retro  # noqa: E731
  muscle_thick = rng.uniform(0.6, 0.9)
  t_muscle = lambda x: t_retro(x) + muscle_thick  # noqa: E731
  layers = [
    Layer("chest_wall", None, _jitter(rng, 0.5), 0.9),
    Layer("skin", band(lambda x: -1.0, lambda x: t_skin), _jitter(rng, 3.0), 0.8),
    Layer("fat", band(lambda x: t_skin, t_fat), fat_echo, 0.6),
    Layer("gland", band(t_fat, t_gland), gland_echo, gland_alpha),
    Layer("fat", band(t_gland, t_retro), fat_echo, 0.6),
    Layer("muscle", band(t_retro, t_muscle), _jitter(rng, 0.45), 1.0),
  ]
  base_muscle = t_retro(0.0)
  for _ in range(rng.integers(3, 6)):  # fibro-fatty striations of the pectoralis
    z = base_muscle + rng.uniform(0.1, muscle_thick - 0.05)
    layers.append(
      Layer(
        "muscle_fibre",
        ellipse(rng.uniform(-half, half), z, half * 1.5, 0.02, rng.uniform(-0.08, 0.08)),
        1.2,
        1.0,
      )
    )
  for _ in range(rng.integers(3, 7)):  # Cooper's ligaments: thin bright oblique bands in the fat
    layers.append(
      Layer(
        "ligament",
        ellipse(
          rng.uniform(-half, half),
          t_skin + rng.uniform(0.2, 0.6),
          rng.uniform(0.4, 1.0),
          0.025,
          rng.uniform(-0.6, 0.6),
        ),
        2.5,
        0.8,
      )
    )
  for _ in range(rng.integers(2, 6)):  # fat lobules inside the glandular layer
    z = t_fat(0.0) + rng.uniform(0.3, gland_thick - 0.2)
    layers.append(
      Layer(
        "fat",
        ellipse(rng.uniform(-half, half), z, rng.uniform(0.2, 0.45), rng.uniform(0.12, 0.25)),
        fat_echo,
        0.6,
      )
    )
  if rng.random() < 0.5:  # a rib: bright cortex, then the bone absorbs (acoustic shadow)
    z = t_muscle(0.0) + rng.uniform(0.3, 0.6)
    x = rng.uniform(-half, half)
    layers.append(Layer("rib", ellipse(x, z + 0.5, 0.9, 0.5), _jitter(rng, 20.0), 20.0))
  host_d = t_fat(0.0) + gland_thick * rng.uniform(0.4, 0.6)
  host = (rng.uniform(-0.3, 0.3) * half, host_d, rng.uniform(0.35, 0.7))
  return Anatomy(layers, host, gland_echo, gland_alpha, "gland", 0.75)


def _abdominal_wall(rng) -> tuple[list[Layer], float]:
  return _body_wall(
    rng,
    [
      ("skin", (0.2, 0.3), _jitter(rng, 3.0), 0.8),
      ("fat", (0.8, 1.8), _jitter(rng, 0.4), 0.6),
      ("muscle", (0.6, 1.0), _jitter(rng, 0.45), 1.0),
      ("peritoneum", (0.08, 0.12), _jitter(rng, 4.0), 0.8),
    ],
  )


def _liver(rng, probe: Probe) -> Anatomy:
  """Abdominal wall over homogeneous liver parenchyma with anechoic vessel cross-sections
  (portal veins with bright walls), bounded deep by the bright curved diaphragm."""
  liv_echo, liv_alpha = _jitter(rng, 1.0, 0.1), 0.5
  wall, depth = _abdominal_wall(rng)
  layers = [Layer("lung", None, _jitter(rng, 0.8), 0.5)]  # mirror image of the liver
  # Diaphragm: a big circle whose deep arc crosses the image; liver inside it.
  dz = rng.uniform(0.65, 0.85) * probe.depth
  dcx, drad = rng.uniform(-3, 3), rng.uniform(9, 14)
  dcd = dz - drad
  layers.append(
    Layer("diaphragm", ellipse(dcx, dcd, drad + 0.2, drad + 0.2), _jitter(rng, 8.0), 1.0)
  )
  layers.append(Layer("liver", ellipse(dcx, dcd, drad, drad), liv_echo, liv_alpha))
  layers.extend(wall)
  half_angle = probe.sector / 2
  for _ in range(rng.integers(4, 9)):
    z = rng.uniform(depth + 1.5, dz - 1.0)
    x = math.tan(half_angle) * (z + probe.radius) * rng.uniform(-0.8, 0.8)
    r = rng.uniform(0.2, 0.6)
    a, ang = r * rng.uniform(1.0, 3.0), rng.uniform(0, math.pi)
    if rng.random() < 0.5:  # portal vein: echogenic fibrous wall
      layers.append(
        Layer("vessel_wall", ellipse(x, z, a + 0.12, r + 0.12, ang), _jitter(rng, 4.0), 0.8)
      )
    layers.append(Layer("vessel", ellipse(x, z, a, r, ang), ANECHOIC, 0.15))
  zh = rng.uniform(depth + 2.0, dz - 2.5)
  host = (
    math.tan(half_angle) * (zh + probe.radius) * rng.uniform(-0.4, 0.4),
    zh,
    rng.uniform(0.8, 1.8),
  )
  return Anatomy(layers, host, liv_echo, liv_alpha, "liver", liv_alpha)


def _kidney(rng, probe: Probe) -> Anatomy:
  """Long-axis kidney seen through the liver: echogenic perirenal fat, bright capsule,
  hypoechoic cortex, darker medullary pyramids and a bright central sinus."""
  cortex_echo, cortex_alpha = _jitter(rng, 0.6), 0.8
  wall, depth = _abdominal_wall(rng)
  cx, cd = rng.uniform(-1.5, 1.5), rng.uniform(0.45, 0.6) * probe.depth
  a, b, ang = rng.uniform(4.0, 5.0), rng.uniform(1.8, 2.3), rng.uniform(-0.35, 0.35)
  layers = [
    Layer("muscle", None, _jitter(rng, 0.45), 1.0),
    Layer(
      "liver",
      band(lambda x: -1.0, wavy(rng, cd - b - rng.uniform(0.5, 1.5), 0.4)),
      _jitter(rng, 1.0, 0.1),
      0.5,
    ),
    *wall,
    Layer("perirenal_fat", ellipse(cx, cd, a + 0.5, b + 0.5, ang), _jitter(rng, 1.6), 0.6),
    Layer("capsule", ellipse(cx, cd, a + 0.08, b + 0.08, ang), _jitter(rng, 3.0), 0.8),
    Layer("cortex", ellipse(cx, cd, a, b, ang), cortex_echo, cortex_alpha),
  ]
  n_pyr = rng.integers(6, 9)
  pyr_echo = _jitter(rng, 0.15)
  cos, sin = math.cos(ang), math.sin(ang)
  for t in np.linspace(0, 2 * math.pi, n_pyr, endpoint=False) + rng.uniform(0, 1):
    u, v = 0.62 * a * math.cos(t), 0.6 * b * math.sin(t)
    px, pd = cx + u * cos - v * sin, cd + u * sin + v * cos
    layers.append(
      Layer(
        "pyramid",
        ellipse(px, pd, rng.uniform(0.4, 0.55), rng.uniform(0.3, 0.4), ang + t + math.pi / 2),
        pyr_echo,
        cortex_alpha,
      )
    )
  layers.append(
    Layer(
      "sinus",
      ellipse(cx, cd, a * rng.uniform(0.45, 0.55), b * rng.uniform(0.3, 0.4), ang),
      _jitter(rng, 3.5),
      0.9,
    )
  )
  if rng.random() < 0.3:  # mildly distended renal pelvis
    layers.append(Layer("pelvis", ellipse(cx, cd, a * 0.2, b * 0.12, ang), ANECHOIC, 0.01))
  t = rng.uniform(0, 2 * math.pi)
  u, v = 0.8 * a * math.cos(t), 0.78 * b * math.sin(t)
  host = (cx + u * cos - v * sin, cd + u * sin + v * cos, rng.uniform(0.7, 1.2))
  return Anatomy(layers, host, cortex_echo, cortex_alpha, "cortex", 0.6)


def _fetal_head(rng, probe: Probe) -> Anatomy:
  """Obstetric view: uterine wall, anechoic amniotic fluid, an elliptical fetal head with a
  bright (partly shadowing) skull ring, midline falx, cavum septi pellucidi and thalami."""
  brain_echo, brain_alpha = _jitter(rng, 0.6), 0.6
  wall, depth = _body_wall(
    rng,
    [
      ("skin", (0.2, 0.3), _jitter(rng, 3.0), 0.8),
      ("fat", (0.5, 1.2), _jitter(rng, 0.4), 0.6),
      ("myometrium", (0.8, 1.5), _jitter(rng, 0.8), 0.7),
    ],
  )
  cx, cd = rng.uniform(-1.5, 1.5), depth + rng.uniform(4.0, 5.0)
  a = rng.uniform(3.6, 4.4)
  b, ang = a * rng.uniform(0.75, 0.85), rng.uniform(-0.5, 0.5)
  t_skull = rng.uniform(0.25, 0.35)
  placenta_top = wavy(rng, cd + b + rng.uniform(1.0, 2.0), 0.4)
  layers = [
    Layer("fluid", None, ANECHOIC, 0.01),
    Layer("placenta", band(placenta_top, lambda x: 1e3), _jitter(rng, 1.2), 0.7),
    *wall,
    Layer("scalp", ellipse(cx, cd, a + 0.25, b + 0.25, ang), _jitter(rng, 0.9), 0.7),
    Layer("skull", ellipse(cx, cd, a, b, ang), _jitter(rng, 30.0, 0.3), 2.0),
    Layer("brain", ellipse(cx, cd, a - t_skull, b - t_skull, ang), brain_echo, brain_alpha),
  ]
  cos, sin = math.cos(ang), math.sin(ang)

  def at(u, v):  # head frame -> image frame
    return cx + u * cos - v * sin, cd + u * sin + v * cos

  for side in (-1, 1):
    layers.append(
      Layer(
        "thalamus",
        ellipse(*at(0.1 * a, side * 0.35), 0.6, 0.35, ang),
        _jitter(rng, 0.2),
        brain_alpha,
      )
    )
  layers.append(
    Layer("falx", ellipse(cx, cd, 0.85 * (a - t_skull), 0.04, ang), _jitter(rng, 3.0), 0.8)
  )
  layers.append(Layer("cavum", ellipse(*at(-0.45 * a, 0.0), 0.45, 0.18, ang), ANECHOIC, 0.01))
  u, v = (
    rng.uniform(0.1, 0.5) * a * rng.choice([-1, 1]),
    rng.uniform(0.35, 0.55) * b * rng.choice([-1, 1]),
  )
  host = (*at(u, v), rng.uniform(0.7, 1.1))
  return Anatomy(layers, host, brain_echo, brain_alpha, "brain", 0.4)


_TEMPLATES = {
  "thyroid": _thyroid,
  "breast": _breast,
  "liver": _liver,
  "kidney": _kidney,
  "fetal_head": _fetal_head,
}


# --------------------------------------------------------------------------------------------
# Lesions.
# --------------------------------------------------------------------------------------------


class Lesion(NamedTuple):
  layer: Layer | None
  calcifications: list[tuple[float, float, float]]  # (x, d, brightness dB over host tissue)


def _benign_shape(rng, cx, cd, r0) -> Shape:
  """Oval, circumscribed, wider than tall, parallel to the skin."""
  a = r0 * rng.uniform(1.0, 1.2)
  return ellipse(cx, cd, a, a * rng.uniform(0.5, 0.72), rng.uniform(-0.17, 0.17))


def _malignant_shape(rng, cx, cd, r0) -> Shape:
  """Taller than wide, with a lobulated, spiculated margin: the boundary radius (in units of a
  tall base ellipse) is 1 + low-order lobulation + narrow triangular spicules."""
  a, b = r0 * rng.uniform(0.6, 0.75), r0 * rng.uniform(1.0, 1.25)
  angle = rng.uniform(-0.17, 0.17)
  orders = np.arange(3, 8)
  lob_amp = rng.uniform(0.0, 0.06, size=orders.size)
  lob_phase = rng.uniform(0, 2 * np.pi, size=orders.size)
  n_spic = rng.integers(6, 12)
  spic_at = rng.uniform(-np.pi, np.pi, size=n_spic)
  spic_len = rng.uniform(0.3, 0.7, size=n_spic)
  spic_width = rng.uniform(0.05, 0.12, size=n_spic)
  reach = 1.0 + lob_amp.sum() + spic_len.max()

  def shape(c: Coords) -> np.ndarray:
    u, v = _rotated(c, cx, cd, angle)
    u, v = u * (1.0 / a), v * (1.0 / b)
    r2 = u * u + v * v
    out = r2 <= reach * reach  # only points that can be inside need the angle
    idx = np.flatnonzero(out)
    uu, vv = u.ravel()[idx], v.ravel()[idx]
    theta = np.arctan2(vv, uu)
    boundary = np.ones_like(theta)
    for k, amp, ph in zip(orders, lob_amp, lob_phase, strict=True):
      boundary += amp * np.cos(k * theta + ph)
    for at, length, width in zip(spic_at, spic_len, spic_width, strict=True):
      gap = np.abs((theta - at + np.pi) % (2 * np.pi) - np.pi)  # angular distance
      boundary += length * np.clip(1.0 - gap / width, 0.0, None)
    res = np.zeros(out.size, bool)
    res[idx] = np.sqrt(uu * uu + vv * vv) <= boundary
    return res.reshape(out.shape)

  return shape


def _lesion(rng, anatomy: Anatomy, label: int) -> Lesion:
  if CLASSES[label] == "normal":
    return Lesion(None, [])
  cx, cd, r0 = anatomy.host
  if CLASSES[label] == "benign":
    # Homogeneous, hypoechoic, and attenuating less than the host: posterior enhancement.
    layer = Layer(
      "lesion",
      _benign_shape(rng, cx, cd, r0),
      anatomy.host_echo * rng.uniform(0.08, 0.25),
      anatomy.host_alpha * rng.uniform(0.3, 0.6),
    )
    return Lesion(layer, [])
  # Markedly hypoechoic and strongly attenuating (posterior shadowing), with microcalcifications.
  layer = Layer(
    "lesion",
    _malignant_shape(rng, cx, cd, r0),
    anatomy.host_echo * rng.uniform(0.03, 0.08),
    rng.uniform(1.3, 2.0),
  )
  n = rng.integers(4, 13)
  rr = 0.55 * r0 * np.sqrt(rng.uniform(0, 1, n))
  tt = rng.uniform(0, 2 * np.pi, n)
  calcs = [
    (cx + 0.65 * r * math.cos(t), cd + r * math.sin(t), rng.uniform(18.0, 26.0))
    for r, t in zip(rr, tt, strict=True)
  ]
  return Lesion(layer, calcs)


def render(layers: list[Layer], coords: Coords):
  """Echogenicity, attenuation (dB/cm/MHz) and an integer tissue label per sample."""
  echo = np.empty(coords.x.shape, _F32)
  alpha = np.empty(coords.x.shape, _F32)
  label = np.zeros(coords.x.shape, np.int16)
  for k, layer in enumerate(layers):
    if layer.shape is None:
      echo.fill(layer.echo)
      alpha.fill(layer.alpha)
      label.fill(k)
      continue
    m = layer.shape(coords)
    echo[m] = layer.echo
    alpha[m] = layer.alpha
    label[m] = k
  return echo, alpha, label

