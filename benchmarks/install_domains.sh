#!/usr/bin/env bash
# The Debian packages the held-out sets of other domains are read from (benchmarks/domains.py). Run as root.
set -euo pipefail
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes wordnet-base bible-kjv bible-kjv-text base-files
