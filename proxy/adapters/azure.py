"""Azure OpenAI: OpenAI's wire format under Azure's paths.

``/openai/deployments/{deployment}/chat/completions?api-version=...`` (and the newer
``/openai/v1/...``), key in the ``api-key`` header. A deployment name is the customer's label, not a
model name, so the model (for the event and for its price) comes from the response; the deployment
stays part of the fingerprint, since it decides what is asked of which model.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .base import RequestMeta, operation_path, without_keys
from .openai import TRANSPORT_FIELDS, OpenAIAdapter


def split_deployment(path: str) -> tuple[str | None, str]:
    """(deployment, the rest of the path) of an Azure path."""
    prefix = "/openai/deployments/"
    if path.startswith(prefix):
        deployment, _, rest = path[len(prefix) :].partition("/")
        return deployment or None, "/" + rest
    if path.startswith("/openai/"):
        return None, path[len("/openai") :]
    return None, path


class AzureOpenAIAdapter(OpenAIAdapter):
    kind: ClassVar[str] = "azure"

    def endpoint(self, path: str) -> str:
        return operation_path(split_deployment(path)[1])

    def describe(self, path: str, body: Any) -> RequestMeta:
        deployment, rest = split_deployment(path)
        endpoint = operation_path(rest)
        if not isinstance(body, dict):
            return RequestMeta(endpoint=endpoint, model=None, stream=False, canonical=body)
        canonical = without_keys(body, TRANSPORT_FIELDS)
        if deployment is not None:
            canonical = {**canonical, "deployment": deployment}
        return RequestMeta(
            endpoint=endpoint,
            model=None,  # a deployment (or the v1 API's "model") names a deployment, not a model
            stream=body.get("stream") is True,
            canonical=canonical,
        )
