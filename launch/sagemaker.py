#!/usr/bin/env python3
"""Submit and follow nxd-lora SageMaker training jobs; the same as ``nxd-lora sagemaker ...``.

    python launch/sagemaker.py submit --config configs/llama3-8b-trn1-tp32.yaml \\
        --role arn:aws:iam::123456789012:role/SageMakerTrn --checkpoint s3://bucket/ckpt/llama3-8b-tp32 \\
        --tokenizer s3://bucket/tokenizers/llama3 --data s3://bucket/data/dolly --output s3://bucket/runs \\
        --instance-count 2 --spot
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nxd_lora.sagemaker.command import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
