"""Train one supervised fastText model in a process that imports nothing else:
`python -m dataprep.filter.fasttext_train`.

fastText's trainer (fasttext-numpy2-wheel) reports "Encountered NaN" when the process has imported certain
other native libraries first (measured here: after importing `dataprep.filter.chain`, every run fails; in a bare
process the same data and options train). So training always runs in its own minimal interpreter.

    python -m dataprep.filter.fasttext_train '{"train_file": ..., "output": ..., "quantize": false, "options": {...}}'
"""

from __future__ import annotations

import json
import sys
from typing import Any


def train(train_file: str, output: str, quantize: bool, options: dict[str, Any]) -> None:
    import fasttext

    model = fasttext.train_supervised(input=train_file, verbose=0, **options)
    if quantize:
        model.quantize(input=train_file, retrain=True, qnorm=True, cutoff=50_000)
    model.save_model(output)


def main(argv: list[str]) -> int:
    request = json.loads(argv[1])
    train(request["train_file"], request["output"], bool(request["quantize"]), request.get("options", {}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
