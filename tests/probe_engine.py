"""Start a vLLM engine on the tiny model and report which backend runs each attention layer.

Run as a script (vLLM spawns its engine core, so the engine needs a __main__ guard):
    python tests/probe_engine.py MODEL [--attention-backend NAME]
Prints one JSON line: {"backends": {layer: [name, backend class, impl class]}, "text": generated text}.
"""

import argparse
import json
import os


def layer_backends(model):
    from vllm.model_executor.layers.attention import Attention
    return {name: [m.attn_backend.get_name(), m.attn_backend.__name__, type(m.impl).__name__]
            for name, m in model.named_modules() if isinstance(m, Attention)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--attention-backend", default=None)
    args = parser.parse_args()
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model ships a function to the worker
    from vllm import LLM, SamplingParams
    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=2048,
              attention_backend=args.attention_backend, seed=0)
    out = llm.generate(["the quick fox jumps over"], SamplingParams(max_tokens=8, temperature=0))
    # Imported by module name, so the worker process can unpickle it by reference.
    from probe_engine import layer_backends
    print(json.dumps({"backends": llm.apply_model(layer_backends)[0], "text": out[0].outputs[0].text}))


if __name__ == "__main__":
    main()
