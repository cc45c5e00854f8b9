"""The vision stage of a pass — CLIP → projector (the LLM's image tokens), the [CLS] attention, SAM's
image encoder — as one value (`VisionFeatures`), and the cache that lets a sweep compute it once per
batch (`FeatureCache`): pruning acts only inside the LLM, so every job of a sweep would otherwise
repeat the same vision work. See docs/design.md, "The feature cache"."""

from cspexp.features.cache import FeatureCache, feature_cache_mode, in_sweep_agent
from cspexp.features.vision import VisionFeatures, encode_vision

__all__ = ["FeatureCache", "VisionFeatures", "encode_vision", "feature_cache_mode", "in_sweep_agent"]
