# weather.py
from altan.sdk import tool

@tool
async def forecast(city: str, days: int = 1) -> dict:
    """Forecast for a city."""          # the docstring is the tool's description
    return {"city": city, "days": days}  # type hints become the input_schema; sync functions work too
