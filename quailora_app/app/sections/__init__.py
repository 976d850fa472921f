"""The page's sections, top to bottom: 1 Setup (`setup`), 2 Quantize & initialize (`init`) with the teaching
views beside it (`views`), 3 Fine-tune (`train`), 4 Results (`results`). Layout only: each builds its components
inside the open gr.Blocks and returns them in a small dataclass; `quailora_app.app.ui` gathers them in a `Page`
and wires them to the handlers (`quailora_app.app.handlers`)."""
