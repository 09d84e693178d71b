"""What every OpenAI route shares: the admission path, the served name, the API key, the chat template."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from fastapi import Request

from serving.admission import Admission, Unavailable
from serving.binding import EngineBinding
from serving.openai import errors
from serving.openai.chat_template import ChatTemplate
from serving.openai.errors import ApiError

DEMO_MODEL_NAME = "energon-demo"


class OpenAIService:
    """What the routes share: the admission path, the served name, the loaded model's template."""

    def __init__(
        self,
        admission: Admission,
        *,
        served_model_name: str,
        api_key: str | None = None,
        chat_template_file: Path | None = None,
    ) -> None:
        self.admission = admission
        self.model_name = served_model_name
        self._key = api_key.encode() if api_key else None
        self._chat_template_file = chat_template_file
        self.chat_template: ChatTemplate | None = None
        self.created = int(time.time())
        self.root = served_model_name

    def load_model_files(self, model_dir: str | None) -> None:
        """Called once the engine is loaded (off the event loop): the chat template, the root."""
        root = Path(model_dir) if model_dir else None
        self.chat_template = ChatTemplate.for_checkpoint(root, self._chat_template_file)
        if model_dir:
            self.root = str(model_dir)

    # -- checks every route makes ------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self._key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self._key):
            raise ApiError(401, "missing or invalid API key", type="authentication_error", code="invalid_api_key")

    def ready(self) -> EngineBinding:
        try:
            return self.admission.ready()
        except Unavailable as e:
            raise errors.from_admission(e) from e

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )
