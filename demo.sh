#!/usr/bin/env bash
# The demo: builds the three programs (release), then starts a chat-server
# and two chatd on loopback and shows a chat between them. Pass --keep to
# leave them running and get the commands to attach to each side.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --quiet -p chat-server -p chatd -p chatctl
exec "${CARGO_TARGET_DIR:-target}/release/chatctl" demo "$@"
