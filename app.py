"""The demo page as a Hugging Face Space: `python app.py` (the same page as `rwkv-state demo`).

Configured by environment variables, each optional:
  RWKV_STATE_HUB_MODEL        base model .pth or hf://owner/repo/file.pth (default: the bundled tiny RWKV-5.2)
  RWKV_STATE_HUB_STATES       comma-separated state files, folders, training runs, Hub repos (default: the bundled
                              example states)
  RWKV_STATE_HUB_TOKENIZER    world | bytes | utf-16-le | tokenizer.json (default: from the vocab)
  RWKV_STATE_HUB_STRATEGY     rwkv pip strategy (default: cpu fp32)
  RWKV_STATE_HUB_CONCURRENCY  requests run at once (default: 2)
  RWKV_STATE_HUB_MAX_UPLOAD_MB, RWKV_STATE_HUB_PREVIEW (0: no example generation at start)
  GRADIO_SERVER_NAME, GRADIO_SERVER_PORT  where to listen (read by Gradio)
"""

import sys

from rwkv_state_hub.demo import create_demo, launch_demo, settings_from_env
from rwkv_state_hub.errors import StateHubError

try:
    demo = create_demo(**settings_from_env())
except StateHubError as e:
    sys.exit(f"Error: {e}")

if __name__ == "__main__":
    launch_demo(demo)
