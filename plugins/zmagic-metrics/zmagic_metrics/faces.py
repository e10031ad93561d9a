"""dlib's face detector, 68-point shape predictor and 128-d face descriptor, with the real weights
that ship in the ``face-recognition-models`` package (read from its folder directly: the package's
own module imports ``pkg_resources``, which new setuptools no longer has).

The descriptor is dlib's ResNet (99.38% on LFW); two photos of one person are closer than 0.6
(dlib's threshold).  Nothing here shares weights with the guides (ArcFace IR-SE50, FaceNet, FAN,
MTCNN), so its distances are an independent judgement of the guided samples.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np

FILES = {
    "landmarks68": "shape_predictor_68_face_landmarks.dat",
    "descriptor": "dlib_face_recognition_resnet_model_v1.dat",
}
INSTALL = "pip install dlib-bin face-recognition-models"


class DlibMissing(RuntimeError):
    """dlib or its model files are not installed (the evaluators report this as a note)."""


def model_folder() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DlibMissing(f"face-recognition-models is not installed ({INSTALL})")
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    missing = [f for f in FILES.values() if not (folder / f).is_file()]
    if missing:
        raise DlibMissing(f"face-recognition-models lacks {', '.join(missing)} in {folder}")
    return folder


class DlibFaces:
    """Detect the main face of an image, its 68 landmarks and its 128-d descriptor."""

    _shared: Optional["DlibFaces"] = None

    def __init__(self):
        try:
            import dlib
        except ImportError:
            raise DlibMissing(f"dlib is not installed ({INSTALL})") from None
        folder = model_folder()
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(folder / FILES["landmarks68"]))
        self.descriptor = dlib.face_recognition_model_v1(str(folder / FILES["descriptor"]))
        self.dlib = dlib

    @classmethod
    def shared(cls) -> "DlibFaces":
        """One instance per process (loading the models takes about a second)."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def box(self, image: np.ndarray, fallback: bool = False):
        """The highest-scoring face box of an (H, W, 3) uint8 image (one upsampling), or None; with
        ``fallback``, a box covering the central 80% of the image when no face is found (aligned
        face crops such as CelebA-HQ's)."""
        image = np.ascontiguousarray(image)
        rects, scores, _ = self.detector.run(image, 1, 0.0)
        if len(rects):
            return rects[int(np.argmax(scores))]
        if not fallback:
            return None
        h, w = image.shape[:2]
        return self.dlib.rectangle(int(0.1 * w), int(0.1 * h), int(0.9 * w), int(0.9 * h))

    def landmarks(self, image: np.ndarray, box=None) -> Optional[np.ndarray]:
        """(68, 2) landmark pixels (x, y) of the main face, or None when no face is found."""
        image = np.ascontiguousarray(image)
        box = box or self.box(image)
        if box is None:
            return None
        shape = self.predictor(image, box)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)

    def descriptor_of(self, image: np.ndarray, box=None) -> Optional[np.ndarray]:
        """The 128-d descriptor of the main face, or None when no face is found."""
        image = np.ascontiguousarray(image)
        box = box or self.box(image)
        if box is None:
            return None
        shape = self.predictor(image, box)
        return np.array(self.descriptor.compute_face_descriptor(image, shape), dtype=np.float64)


def id_distance(faces: DlibFaces, a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance of the two images' 128-d descriptors (NaN when a face is missing)."""
    da, db = faces.descriptor_of(a), faces.descriptor_of(b)
    if da is None or db is None:
        return float("nan")
    return float(np.linalg.norm(da - db))


def landmark_distance(points: np.ndarray, target: np.ndarray, width: float, target_width: float) -> float:
    """Mean distance between corresponding landmarks, each set in fractions of its image's width."""
    return float(np.linalg.norm(points / width - target / target_width, axis=1).mean())
