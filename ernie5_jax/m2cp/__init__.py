"""M2CP: multimodal semi-supervised 3-D classification and retrieval (Chen et al., BMVC 2021)."""
