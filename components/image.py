"""The container image every component runs in (see images/ and the Makefile).

Locally (kfp.local SubprocessRunner with use_venv=False) the image is not
used: components run in the installed environment.  In a cluster, KFP starts
each task in this image, which has the library and kfp preinstalled, so
components use ``install_kfp_package=False`` and install nothing at run time.
"""

import os

IMAGE_REPOSITORY = os.environ.get("LMCOMPOSE_IMAGE_REPOSITORY", "ghcr.io/lm-compose/lm-compose")
IMAGE_TAG = os.environ.get("LMCOMPOSE_IMAGE_TAG", "0.1.0")
CPU_IMAGE = f"{IMAGE_REPOSITORY}:{IMAGE_TAG}-cpu"
CUDA_IMAGE = f"{IMAGE_REPOSITORY}:{IMAGE_TAG}-cuda"
#: the image components are declared with; GPU placement is set per task by the pipeline builder
BASE_IMAGE = os.environ.get("LMCOMPOSE_BASE_IMAGE", CUDA_IMAGE)
