"""Procedural 3-D shapes for offline M2CP runs (pure numpy; no TFDS, no network).

Each object is a union of deformed superquadric / supertoroid parts (Barr, "Superquadrics
and angle-preserving transformations", IEEE CG&A 1981) from one of 12 classes. Intra-class
variation: part sizes and counts, roundness exponents, anisotropic scale, taper / bend
deformations, per-vertex noise, a random pose (yaw + small tilt), point jitter and outliers;
several classes share parts (table / chair, cone / lamp / mushroom, ellipsoid / snowman,
box / cylinder) so that few labels do not suffice. Every random choice comes from
`np.random.default_rng((seed, split id, index))`: an example does not depend on order.
"""

from __future__ import annotations

import numpy as np

from data.shapes3d import geometry

CLASSES = ("ellipsoid", "box", "cylinder", "cone", "torus", "dumbbell", "table", "chair",
           "mushroom", "snowman", "jack", "lamp")
NUM_POINTS = 1024  # Sampled points per object.
NUM_FACES = 384  # Mesh faces per object (sampled / padded).
NUM_VIEWS = 12
VIEW_SIZE = 32  # Rendered view side, pixels.
_RENDER_SAMPLES = 3000  # Surface samples splatted per render.
_SPLIT_IDS = {"train": 1, "test": 2}


def _spow(x, e):
  return np.sign(x) * np.abs(x) ** e


def _grid_faces(rings: int, segments: int) -> np.ndarray:
  """Faces of a closed grid: pole 0, `rings` rings of `segments` vertices, pole 1 (last)."""
  s = np.arange(segments)
  faces = [np.stack([np.zeros(segments, int), 1 + (s + 1) % segments, 1 + s], -1)]
  for r in range(rings - 1):
    a, b = 1 + r * segments + s, 1 + r * segments + (s + 1) % segments
    c, d = a + segments, b + segments
    faces += [np.stack([a, b, d], -1), np.stack([a, d, c], -1)]
  last = 1 + rings * segments
  base = 1 + (rings - 1) * segments
  faces.append(np.stack([np.full(segments, last), base + s, base + (s + 1) % segments], -1))
  return np.concatenate(faces)


def superquadric(size, e1: float, e2: float, rings: int = 4, segments: int = 8):
  """Superellipsoid with semi-axes size=(a, b, c): returns (vertices [V, 3], faces [F, 3])."""
  eta = np.linspace(-np.pi / 2, np.pi / 2, rings + 2)[1:-1]
  omega = np.linspace(-np.pi, np.pi, segments, endpoint=False)
  ce, se = _spow(np.cos(eta), e1)[:, None], _spow(np.sin(eta), e1)[:, None]
  x = ce * _spow(np.cos(omega), e2)
  y = ce * _spow(np.sin(omega), e2)
  z = np.broadcast_to(se, x.shape)
  ring = np.stack([x, y, z], -1).reshape(-1, 3)
  verts = np.concatenate([[[0, 0, -1]], ring, [[0, 0, 1]]]) * np.asarray(size)
  return verts, _grid_faces(rings, segments)


def supertoroid(radius: float, tube: float, e1: float, e2: float, rings: int = 6,
                segments: int = 12):
  """Supertoroid in the xy plane: returns (vertices [V, 3], faces [F, 3])."""
  eta = np.linspace(-np.pi, np.pi, rings, endpoint=False)
  omega = np.linspace(-np.pi, np.pi, segments, endpoint=False)
  w = radius + tube * _spow(np.cos(eta), e1)[:, None]
  x, y = w * _spow(np.cos(omega), e2), w * _spow(np.sin(omega), e2)
  z = np.broadcast_to(tube * _spow(np.sin(eta), e1)[:, None], x.shape)
  verts = np.stack([x, y, z], -1).reshape(-1, 3)
  r, s = np.meshgrid(np.arange(rings), np.arange(segments), indexing="ij")
  a, b = r * segments + s, r * segments + (s + 1) % segments
  c, d = ((r + 1) % rings) * segments + s, ((r + 1) % rings) * segments + (s + 1) % segments
  faces = np.concatenate([np.stack([a, b, d], -1).reshape(-1, 3),
                          np.stack([a, d, c], -1).reshape(-1, 3)])
  return verts, faces


def _rotation(axis: str, angle: float) -> np.ndarray:
  c, s = np.cos(angle), np.sin(angle)
  i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
  m = np.eye(3)
  m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
  return m


class _Parts:
  """Accumulates transformed parts into one mesh."""

  def __init__(self):
    self.verts, self.faces, self.count = [], [], 0

  def add(self, mesh, at=(0.0, 0.0, 0.0), rot: np.ndarray | None = None):
    v, f = mesh
    if rot is not None:
      v = v @ rot.T
    self.verts.append(v + np.asarray(at))
    self.faces.append(f + self.count)
    self.count += len(v)

  def mesh(self):
    return np.concatenate(self.verts), np.concatenate(self.faces)


def _box(rng, size, lo=0.08, hi=0.35):
  return superquadric(size, rng.uniform(lo, hi), rng.uniform(lo, hi))


def _rod(rng, radius, half_len):
  return superquadric((radius, radius, half_len), rng.uniform(0.1, 0.3), rng.uniform(0.8, 1.2))


def _ball(rng, r):
  return superquadric(r * rng.uniform(0.85, 1.15, 3), rng.uniform(0.8, 1.2),
                      rng.uniform(0.8, 1.2))


def _taper(verts, k):
  """Linear taper along z (Barr 1984): x, y scaled by 1 + k z / z_max."""
  z = verts[:, 2] / max(np.abs(verts[:, 2]).max(), 1e-9)
  return verts * np.stack([1 + k * z, 1 + k * z, np.ones_like(z)], -1)


def _make_class(label: int, rng: np.random.Generator):
  """The undeformed-pose mesh of one object of class `label`."""
  u = rng.uniform
  p = _Parts()
  name = CLASSES[label]
  if name == "ellipsoid":
    p.add(superquadric(u(0.5, 1.2, 3), u(0.6, 1.4), u(0.6, 1.4)))
  elif name == "box":
    p.add(_box(rng, u(0.35, 1.2, 3), 0.1, 0.5))
  elif name == "cylinder":
    r = u(0.25, 0.7)
    rot = _rotation("x", np.pi / 2) if u() < 0.4 else None  # Upright or lying.
    p.add(superquadric((r, r * u(0.8, 1.2), u(0.5, 1.3)), u(0.1, 0.4), u(0.75, 1.25)), rot=rot)
  elif name == "cone":
    r = u(0.4, 0.9)
    v, f = superquadric((r, r, u(0.6, 1.2)), u(0.1, 0.4), u(0.8, 1.2), rings=5)
    p.add((_taper(v, -u(0.7, 0.95)), f))
  elif name == "torus":
    rot = _rotation("x", u(0, np.pi / 2)) if u() < 0.5 else None
    p.add(supertoroid(u(0.6, 1.0), u(0.15, 0.4), u(0.5, 1.3), u(0.7, 1.2)), rot=rot)
  elif name == "dumbbell":
    half = u(0.6, 1.1)
    r = u(0.25, 0.5)
    p.add(_rod(rng, u(0.06, 0.15), half), rot=_rotation("y", np.pi / 2))
    p.add(_ball(rng, r), at=(-half, 0, 0))
    p.add(_ball(rng, r * u(0.8, 1.2)), at=(half, 0, 0))
  elif name in ("table", "chair"):
    a, b = u(0.5, 1.0), u(0.5, 1.0)
    h = u(0.4, 0.9)
    th = u(0.03, 0.1)
    p.add(_box(rng, (a, b, th)), at=(0, 0, h))
    leg_r = u(0.04, 0.1)
    if name == "table" and u() < 0.3:  # Pedestal table.
      p.add(_rod(rng, leg_r * 2, h / 2), at=(0, 0, h / 2))
    else:
      inset = u(0.75, 0.95)
      for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        p.add(_rod(rng, leg_r, h / 2), at=(sx * a * inset, sy * b * inset, h / 2))
    if name == "chair":
      back = u(0.4, 0.9)
      tilt = _rotation("x", u(-0.25, 0.05))
      p.add(_box(rng, (a, th, back / 2)), at=(0, -b, h + back / 2), rot=tilt)
  elif name == "mushroom":
    stem_h = u(0.4, 0.9)
    p.add(_rod(rng, u(0.1, 0.3), stem_h / 2), at=(0, 0, stem_h / 2))
    cap = u(0.5, 1.0)
    p.add(superquadric((cap, cap * u(0.85, 1.15), u(0.15, 0.4)), u(0.6, 1.2), u(0.8, 1.2)),
          at=(0, 0, stem_h))
  elif name == "snowman":
    z, r = 0.0, u(0.45, 0.65)
    for _ in range(rng.integers(2, 4)):
      p.add(_ball(rng, r), at=(u(-0.05, 0.05), u(-0.05, 0.05), z + r))
      z += 2 * r * u(0.8, 0.95)
      r *= u(0.55, 0.8)
  elif name == "jack":
    arms = ((0, 1, 2), (1, 0, 2), (2, 0, 1))[:rng.integers(2, 4)]
    for long_axis, *_ in arms:
      size = np.full(3, u(0.08, 0.2))
      size[long_axis] = u(0.7, 1.1)
      p.add(_box(rng, size))
  elif name == "lamp":
    base_r = u(0.3, 0.6)
    p.add(superquadric((base_r, base_r, u(0.03, 0.08)), 0.2, 1.0))
    stem = u(0.6, 1.2)
    p.add(_rod(rng, u(0.03, 0.08), stem / 2), at=(0, 0, stem / 2))
    shade_r = u(0.3, 0.6)
    v, f = superquadric((shade_r, shade_r, u(0.2, 0.4)), 0.2, 1.0)
    p.add((_taper(v, -u(0.3, 0.6)), f), at=(0, 0, stem))
  else:
    raise ValueError(f"label={label} is not accepted: expected 0..{len(CLASSES) - 1}")
  return p.mesh()


def make_mesh(label: int, rng: np.random.Generator):
  """A random object of class label, deformed, posed and normalised into the unit sphere."""
  v, f = _make_class(label, rng)
  v = v * rng.uniform(0.75, 1.3, 3)  # Anisotropic scale.
  zmax = max(np.abs(v[:, 2]).max(), 1e-9)
  v[:, 0] += rng.uniform(-0.25, 0.25) * (v[:, 2] / zmax) ** 2  # Bend.
  v = v + rng.normal(0, rng.uniform(0.005, 0.03), v.shape)  # Surface noise.
  rot = (_rotation("z", rng.uniform(0, 2 * np.pi)) @ _rotation("x", rng.uniform(-0.25, 0.25))
         @ _rotation("y", rng.uniform(-0.25, 0.25)))
  v = v @ rot.T
  v = v - (v.max(0) + v.min(0)) / 2
  v = v / np.linalg.norm(v, axis=-1).max()
  return v, f


def make_example(label: int, seed: int, split: str, index: int) -> dict[str, np.ndarray]:
  """Point cloud, MeshNet face features and 12 rendered views of one random object."""
  rng = np.random.default_rng((seed, _SPLIT_IDS[split], index))
  v, f = make_mesh(label, rng)
  points, _ = geometry.sample_surface(v, f, NUM_POINTS, rng)
  points += rng.normal(0, 0.01, points.shape).astype(np.float32)  # Scanner-like jitter.
  outliers = rng.random(NUM_POINTS) < 0.01
  points[outliers] = rng.uniform(-1, 1, (int(outliers.sum()), 3))
  dense, normals = geometry.sample_surface(v, f, _RENDER_SAMPLES, rng)
  views = geometry.render_views(dense, normals, NUM_VIEWS, VIEW_SIZE)
  example = {"label": label, "points": points, "views": views}
  example.update(geometry.mesh_face_features(v, f, NUM_FACES, rng))
  return example


def labels(split: str, per_class: int, seed: int) -> np.ndarray:
  """The label of each example of a split: per_class of each class, in a seeded order."""
  lab = np.repeat(np.arange(len(CLASSES)), per_class)
  return np.random.default_rng((seed, _SPLIT_IDS[split], 99)).permutation(lab)
