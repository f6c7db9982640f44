"""``python -m boneage.report``: rewrite ``SCHEMA.md`` from the field table (``boneage.report.fields``)."""

from boneage.report.fields import SCHEMA_MD, render_markdown
from boneage.report.schema import SCHEMA_VERSION

SCHEMA_MD.write_text(render_markdown(SCHEMA_VERSION))
print(f"wrote {SCHEMA_MD}")
