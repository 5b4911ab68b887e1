"""Write docs/reference.md, the recipe reference, from the recipe's schema (finetune/recipe_schema.py's field comments).

    python scripts/make_reference.py          # after changing a key, its default or its comment
"""

from pathlib import Path

from finetune.schema import reference_markdown

if __name__ == "__main__":
    page = Path(__file__).resolve().parents[1] / "docs" / "reference.md"
    page.write_text(reference_markdown())
    print(f"recipe reference written to {page}")
