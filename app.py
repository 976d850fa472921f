"""QuAILoRA Studio: the web app's entry point (Hugging Face Spaces runs this file).

Local: `python app.py` (PORT, GRADIO_SERVER_NAME and GRADIO_SERVER_PORT are honoured)."""
from quailora_app.ui import build_ui, launch_options

demo = build_ui()

if __name__ == "__main__":
    demo.launch(**launch_options())
