"""The registered model as an MLflow pyfunc (logged as code, no pickle).

``mlflow.pyfunc.load_model("models:/forgetless-lm@champion").predict(["What is ...?"])``
returns the model's greedy answers. The weights are the ``model_dir`` artifact: a plain
transformers folder (merged LoRA weights, tokenizer, strategy state).
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class ForgetlessLM(PythonModel):
    def load_context(self, context) -> None:
        from flows.modeling import load_model

        self.model, self.tokenizer = load_model(context.artifacts["model_dir"])
        self.use_chat_template = bool((context.model_config or {}).get("use_chat_template", True))
        self.max_new_tokens = int((context.model_config or {}).get("max_new_tokens", 32))

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        from flows.data import Example
        from flows.scoring import generate

        prompts = [model_input] if isinstance(model_input, str) else list(model_input)
        examples = [
            Example(
                id=str(i),
                messages=[{"role": "user", "content": p}],
                completion="",
                answers=[],
                task="",
            )
            for i, p in enumerate(prompts)
        ]
        return generate(
            self.model, self.tokenizer, examples, self.use_chat_template, self.max_new_tokens, 8
        )


mlflow.models.set_model(ForgetlessLM())
