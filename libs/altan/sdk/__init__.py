"""The tool developer's SDK: ``@tool`` makes a tool of a function; ``altan serve-tools`` serves a module's tools.

```python
from altan.sdk import tool

@tool
async def forecast(city: str, days: int = 1) -> dict:
    \"\"\"Forecast for a city.\"\"\"
    return {"city": city, "days": days}
```

See docs/tool-developers.md.
"""

from altan.sdk._tool import Tool, ToolContext, ToolCredential, ToolError, tool

__all__ = ["Tool", "ToolContext", "ToolCredential", "ToolError", "tool"]
