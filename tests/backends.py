"""The model runners the engine tests run for (issue 16): parametrize a test with
`@pytest.mark.parametrize("backend", BACKENDS)`; it overrides conftest's `backend` fixture
(default "torch") that the engine fixtures pass to ExecutorConfig.backend."""

from __future__ import annotations

from importlib.util import find_spec

import pytest

needs_ort = pytest.mark.skipif(find_spec("onnxruntime") is None, reason="no onnxruntime")
BACKENDS = ["torch", pytest.param("onnxruntime", marks=needs_ort)]
