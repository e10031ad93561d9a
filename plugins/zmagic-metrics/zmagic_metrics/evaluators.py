"""Independent evaluators for zmagic experiments, one per condition kind they judge.

Each is registered through ``register_evaluators`` and returns, per run, the form that
``zmagic eval`` reads: ``{"metrics": {key: {"label", "better", "per_sample", "independent",
"network"}}, "note": ...}``.  When its network or weights are missing it returns only a ``note``
saying what is missing and where to put it, and the experiment's report lists that note.

Independence: a metric is computed by a network other than the guide's.  dlib's descriptor and
68-point predictor for face ID and landmarks (the guides use ArcFace / FaceNet and FAN / O-Net);
CLIP ViT-L/14 for text (the guide uses ViT-B/16; a guide that is ViT-L/14 itself is flagged);
SegFormer and BiSeNet for segmentation (the one the guide uses is flagged); VGG19 Gram matrices
for style (the paper's Table 2 style loss; flagged when the guide is VGG19 too).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from zmagic_core import ConfigError, Evaluator, FinishedRun, InputError, WeightsNotFoundError, load_image

from .faces import DlibFaces, DlibMissing, landmark_distance


def _uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def conditions_of(recipe: dict, kinds: tuple[str, ...]) -> list[dict]:
    return [c for c in recipe.get("conditions") or [] if c.get("kind") in kinds]


def _option(condition: dict, key: str) -> Any:
    return (condition.get("options") or {}).get(key, condition.get(key))


def _label(condition: dict) -> str:
    return condition.get("name") or condition.get("kind")


def _nan_list(values) -> list[Optional[float]]:
    return [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]


class _ByKind(Evaluator):
    kinds: tuple[str, ...] = ()

    def applies_to(self, recipe: dict) -> bool:
        return bool(conditions_of(recipe, self.kinds))


# -- faces: dlib ---------------------------------------------------------------------------------------
class DlibIdEvaluator(_ByKind):
    """ID distance: dlib 128-d descriptors of each sample's face and the faceid reference's."""

    kinds = ("faceid",)

    def evaluate(self, run: FinishedRun) -> dict:
        try:
            faces = DlibFaces.shared()
        except DlibMissing as exc:
            return {"note": f"skipped: {exc}"}
        metrics, notes = {}, []
        for cond in conditions_of(run.recipe, self.kinds):
            name, reference = _label(cond), _option(cond, "reference")
            try:
                ref = _uint8(load_image(reference))
            except (InputError, TypeError) as exc:
                notes.append(f"{name}: reference unreadable ({exc})")
                continue
            ref_descriptor = faces.descriptor_of(ref, faces.box(ref, fallback=True))
            found, distances = [], []
            for image in run.images:
                img = _uint8(image)
                box = faces.box(img)
                found.append(box is not None)
                d = faces.descriptor_of(img, box or faces.box(img, fallback=True))
                distances.append(float(np.linalg.norm(d - ref_descriptor)))
            metrics[f"id_distance_dlib:{name}"] = {
                "label": f"ID distance ({name}, dlib)", "better": "lower", "per_sample": distances,
                "independent": True, "network": "dlib ResNet 128-d face descriptor"}
            metrics[f"face_found_dlib:{name}"] = {
                "label": f"face found ({name}, dlib HOG)", "better": "higher", "per_sample": found,
                "independent": True, "network": "dlib HOG frontal face detector"}
        out: dict = {"metrics": metrics}
        if notes:
            out["note"] = "; ".join(notes)
        if any(not f for m in metrics.values() if "face found" in m["label"] for f in m["per_sample"]):
            out["note"] = "; ".join(notes + ["samples where dlib found no face are measured on the central "
                                             "80% of the image"])
        return out


class DlibLandmarkEvaluator(_ByKind):
    """Landmark distance: dlib's 68 points on each sample and on the landmark reference, mean point
    distance in fractions of the image width."""

    kinds = ("landmark",)

    def evaluate(self, run: FinishedRun) -> dict:
        try:
            faces = DlibFaces.shared()
        except DlibMissing as exc:
            return {"note": f"skipped: {exc}"}
        metrics, notes = {}, []
        for cond in conditions_of(run.recipe, self.kinds):
            name, reference = _label(cond), _option(cond, "reference")
            if not reference:
                notes.append(f"{name}: no reference image (target points files are not judged)")
                continue
            try:
                ref = _uint8(load_image(reference))
            except (InputError, TypeError) as exc:
                notes.append(f"{name}: reference unreadable ({exc})")
                continue
            target = faces.landmarks(ref, faces.box(ref, fallback=True))
            distances = []
            for image in run.images:
                img = _uint8(image)
                points = faces.landmarks(img, faces.box(img, fallback=True))
                distances.append(landmark_distance(points, target, img.shape[1], ref.shape[1]))
            metrics[f"landmark_distance_dlib:{name}"] = {
                "label": f"landmark distance ({name}, dlib 68, image widths)", "better": "lower",
                "per_sample": distances, "independent": True, "network": "dlib 68-point shape predictor"}
        out: dict = {"metrics": metrics}
        if notes:
            out["note"] = "; ".join(notes)
        return out


# -- text: CLIP ViT-L/14 ------------------------------------------------------------------------------
class ClipLargeTextEvaluator(_ByKind):
    """Text distance 1 - cos(image, text) with CLIP ViT-L/14 (OpenAI weights, local files only)."""

    kinds = ("clip-text",)
    model, pretrained = "ViT-L-14", "openai"

    def __init__(self, device: torch.device = torch.device("cpu"), checkpoint: Optional[str] = None):
        self.device, self.checkpoint = device, checkpoint
        self._loaded = None

    def evaluate(self, run: FinishedRun) -> dict:
        try:
            from zmagic_clip import load_open_clip
        except ImportError:
            return {"note": "skipped: the CLIP ViT-L/14 text distance needs the zmagic-clip plugin (open_clip)"}
        try:
            if self._loaded is None:
                self._loaded = load_open_clip(self.model, self.pretrained, checkpoint=self.checkpoint,
                                              download=False, device=self.device, what="clip ViT-L/14 evaluator")
        except (WeightsNotFoundError, ConfigError, InputError) as exc:
            return {"note": f"skipped: CLIP ViT-L/14 weights are not on this machine ({exc})"}
        import open_clip
        import torch.nn.functional as F

        loaded = self._loaded
        tokenizer = open_clip.get_tokenizer(self.model)
        mean = torch.tensor(loaded.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(loaded.std, device=self.device).view(1, 3, 1, 1)
        with torch.no_grad():
            x = F.interpolate((run.images.to(self.device) + 1) / 2, size=(loaded.image_size,) * 2, mode="bicubic",
                              align_corners=False)
            image_emb = F.normalize(loaded.model.encode_image((x - mean) / std).float(), dim=-1)
            metrics = {}
            for cond in conditions_of(run.recipe, self.kinds):
                name, prompt = _label(cond), _option(cond, "prompt")
                text_emb = F.normalize(loaded.model.encode_text(tokenizer([prompt]).to(self.device)).float(), dim=-1)
                same = (_option(cond, "model") or "ViT-B-16").replace("/", "-") == self.model
                metrics[f"text_distance_clip_l14:{name}"] = {
                    "label": f"text distance ({name}, CLIP ViT-L/14)", "better": "lower",
                    "per_sample": (1 - image_emb @ text_emb[0]).tolist(), "independent": not same,
                    "network": "open_clip ViT-L-14 openai" + (" (the guide's own network)" if same else "")}
        return {"metrics": metrics}


# -- segmentation: SegFormer and BiSeNet ------------------------------------------------------------
class SegmentationEvaluator(_ByKind):
    """Segmentation distance: the fraction of pixels whose face-parsing class differs between each
    sample and the parsing reference, by SegFormer and by BiSeNet (whichever have their weights)."""

    kinds = ("parsing",)

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = device
        self._parsers: dict[str, Any] = {}

    def _parser(self, backbone: str):
        if backbone not in self._parsers:
            from zmagic_parsing.energy import build_bisenet_parser, build_segformer_parser

            build = build_bisenet_parser if backbone == "bisenet" else build_segformer_parser
            self._parsers[backbone] = build(None).to(self.device).eval()
        return self._parsers[backbone]

    @staticmethod
    def labels(parser, images: torch.Tensor, size: int = 512) -> torch.Tensor:
        import torch.nn.functional as F

        from zmagic_parsing.energy import resize

        with torch.no_grad():
            logits = parser(resize(images, size))
            logits = F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)
        return logits.argmax(1)

    def evaluate(self, run: FinishedRun) -> dict:
        try:
            import zmagic_parsing  # noqa: F401  (the parsers come from the zmagic-parsing plugin)
        except ImportError:
            return {"note": "skipped: segmentation distance needs the zmagic-parsing plugin (BiSeNet, SegFormer)"}
        metrics, notes = {}, []
        for backbone, label in (("segformer", "SegFormer"), ("bisenet", "BiSeNet")):
            try:
                parser = self._parser(backbone)
            except (WeightsNotFoundError, ConfigError, InputError) as exc:
                notes.append(f"{label} skipped: weights not on this machine ({' '.join(str(exc).split())})")
                continue
            for cond in conditions_of(run.recipe, self.kinds):
                name = _label(cond)
                ref = load_image(_option(cond, "reference"))[None].to(self.device)
                target = self.labels(parser, ref)
                got = self.labels(parser, run.images.to(self.device))
                guide = (_option(cond, "backbone") or "bisenet") == backbone
                metrics[f"segmentation_{backbone}:{name}"] = {
                    "label": f"segmentation distance ({name}, {label}, pixel disagreement)", "better": "lower",
                    "per_sample": (got != target).float().mean((1, 2)).tolist(), "independent": not guide,
                    "network": label + (" (the guide's own network)" if guide else "")}
        out: dict = {"metrics": metrics}
        if notes:
            out["note"] = "; ".join(notes)
        return out


# -- style: VGG19 Gram matrices (the paper's Table 2) ---------------------------------------------------
class VggStyleEvaluator(_ByKind):
    """Style loss: sum over Gatys' layers (relu1_1 .. relu5_1) of the mean squared difference of the
    Gram matrices (F F^T / positions) of VGG19 features, sample vs style reference."""

    kinds = ("style",)

    def __init__(self, device: torch.device = torch.device("cpu"), weights: Optional[str] = None):
        self.device, self.weights = device, weights
        self._net = None

    def evaluate(self, run: FinishedRun) -> dict:
        try:
            from zmagic_style import GATYS_LAYERS, VggFeatures
            from zmagic_style.backbones import vgg19_weights_file
        except ImportError:
            return {"note": "skipped: the VGG style loss needs the zmagic-style plugin"}
        try:
            if self._net is None:
                from zmagic_core import read_state_dict

                path = vgg19_weights_file(self.weights, None, download=False)
                self._net = VggFeatures(read_state_dict(path, "VGG19"), GATYS_LAYERS, 224, str(path)).to(self.device)
        except (WeightsNotFoundError, ConfigError, InputError) as exc:
            return {"note": f"skipped: VGG19 weights are not on this machine ({' '.join(str(exc).split())})"}
        metrics = {}
        with torch.no_grad():
            feats = self._net(run.images.to(self.device))
            for cond in conditions_of(run.recipe, self.kinds):
                name = _label(cond)
                ref = self._net(load_image(_option(cond, "reference"))[None].to(self.device))
                loss = sum(((gram(f) - gram(r)) ** 2).mean((1, 2)) for f, r in zip(feats, ref))
                same = _option(cond, "backbone") == "vgg"
                metrics[f"style_loss_vgg:{name}"] = {
                    "label": f"style loss ({name}, VGG19 Gram)", "better": "lower", "per_sample": loss.tolist(),
                    "independent": not same, "network": "VGG19 ImageNet" + (" (the guide's own)" if same else "")}
        return {"metrics": metrics}


def gram(features: torch.Tensor) -> torch.Tensor:
    """(B, C, N) -> (B, C, C): F F^T / N."""
    return features @ features.transpose(1, 2) / features.shape[-1]


EVALUATORS = {
    "face-id-dlib": DlibIdEvaluator,
    "landmarks-dlib": DlibLandmarkEvaluator,
    "text-clip-l14": ClipLargeTextEvaluator,
    "segmentation": SegmentationEvaluator,
    "style-vgg": VggStyleEvaluator,
}
