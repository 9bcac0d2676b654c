"""Generated ``tool_call`` chats: a JSON Schema tool list, a user request, the assistant's call
with arguments that match the schema, the tool's JSON result and the assistant's answer.

Documents use the Hugging Face chat format: ``{"tools": [...], "messages": [...]}`` with assistant
``tool_calls`` (dict arguments) and ``tool`` messages. The schemas and simulated results here are
shared with the ``agent`` transcripts in :mod:`mixq.corpus_agent`.
"""

from __future__ import annotations

import datetime
import json
import random
from typing import Callable, Iterator

CITIES = [
    "Lisbon",
    "Paris",
    "Frankfurt",
    "New York",
    "Tokyo",
    "Sydney",
    "Toronto",
    "Mumbai",
    "Nairobi",
]
AIRPORTS = {
    "Lisbon": "LIS",
    "Paris": "CDG",
    "Frankfurt": "FRA",
    "New York": "JFK",
    "Tokyo": "HND",
    "Sydney": "SYD",
    "Toronto": "YYZ",
    "Mumbai": "BOM",
    "Nairobi": "NBO",
}
AIRLINES = ["TP", "AF", "LH", "UA", "NH", "QF", "AC", "AI", "KQ"]
CONDITIONS = ["sunny", "partly cloudy", "overcast", "light rain", "heavy rain", "foggy", "windy"]
USD_RATES = {
    "USD": 1.0,
    "EUR": 0.92,
    "GBP": 0.79,
    "JPY": 151.0,
    "CHF": 0.9,
    "CAD": 1.36,
    "INR": 83.0,
}
PEOPLE = ["Ava", "Ben", "Chloe", "Diego", "Elif", "Hana", "Kofi", "Lena", "Omar", "Priya", "Wen"]


def function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    """A tool in the OpenAI/Hugging Face format with JSON Schema parameters."""
    parameters = {"type": "object", "properties": properties, "required": required}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


def call(thought: str, *calls: tuple[str, dict]) -> dict:
    """An assistant turn that says ``thought`` and calls tools ``(name, arguments)``."""
    tool_calls = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]
    return {"role": "assistant", "content": thought, "tool_calls": tool_calls}


def result(name: str, payload: object) -> dict:
    """The ``tool`` message carrying ``payload`` as JSON."""
    return {"role": "tool", "name": name, "content": json.dumps(payload)}


def some_day(rng: random.Random) -> datetime.date:
    return datetime.date(2025, 1, 1) + datetime.timedelta(days=rng.randrange(365))


def email(name: str) -> str:
    return f"{name.lower()}@example.com"


TEXT = {"type": "string"}
DATE = {"type": "string", "format": "date"}
WEATHER = function(
    "get_weather",
    "Get the current weather for a city.",
    {
        "city": {"type": "string", "description": "City name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    ["city"],
)
CONVERT = function(
    "convert_currency",
    "Convert an amount of money between currencies at today's rate.",
    {
        "amount": {"type": "number", "minimum": 0},
        "from_currency": {"type": "string", "enum": list(USD_RATES)},
        "to_currency": {"type": "string", "enum": list(USD_RATES)},
    },
    ["amount", "from_currency", "to_currency"],
)
FLIGHTS = function(
    "search_flights",
    "Search one-way flights between two airports on a date.",
    {
        "origin": {"type": "string", "description": "IATA airport code"},
        "destination": {"type": "string", "description": "IATA airport code"},
        "date": DATE,
        "max_stops": {"type": "integer", "minimum": 0, "maximum": 2},
    },
    ["origin", "destination", "date"],
)
ORDER = function(
    "get_order_status",
    "Look up the shipping status of an order.",
    {"order_id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{6}$"}},
    ["order_id"],
)
TIMER = function(
    "set_timer",
    "Start a countdown timer.",
    {"minutes": {"type": "integer", "minimum": 1, "maximum": 720}, "label": TEXT},
    ["minutes"],
)
LOAN = function(
    "loan_payment",
    "Monthly payment and total interest of a fixed-rate loan.",
    {
        "principal": {"type": "number", "minimum": 0},
        "annual_rate_percent": {"type": "number", "minimum": 0},
        "years": {"type": "integer", "minimum": 1},
    },
    ["principal", "annual_rate_percent", "years"],
)
EVENT = function(
    "create_event",
    "Add an event to the user's calendar.",
    {
        "title": TEXT,
        "date": DATE,
        "start_time": {"type": "string", "pattern": "^[0-9]{2}:[0-9]{2}$"},
        "duration_minutes": {"type": "integer", "minimum": 5},
        "attendees": {"type": "array", "items": {"type": "string", "format": "email"}},
    },
    ["title", "date", "start_time", "duration_minutes"],
)
EMAIL = function(
    "send_email",
    "Send an email from the user's account.",
    {"to": {"type": "string", "format": "email"}, "subject": TEXT, "body": TEXT},
    ["to", "subject", "body"],
)


def weather(rng: random.Random, city: str, unit: str = "celsius") -> dict:
    celsius = rng.randint(-5, 35)
    temperature = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    return {
        "city": city,
        "temperature": temperature,
        "unit": unit,
        "conditions": rng.choice(CONDITIONS),
        "humidity_percent": rng.randint(20, 95),
    }


def describe_weather(report: dict) -> str:
    degrees = f"{report['temperature']}°{report['unit'][0].upper()}"
    humidity = f"{report['humidity_percent']}% humidity"
    return f"{degrees} and {report['conditions']} in {report['city']} ({humidity})"


def conversion(amount: float, source: str, target: str) -> dict:
    rate = round(USD_RATES[target] / USD_RATES[source], 4)
    return {
        "amount": amount,
        "from": source,
        "to": target,
        "rate": rate,
        "converted": round(amount * rate, 2),
    }


def flights(rng: random.Random, arguments: dict) -> list[dict]:
    options = []
    for _ in range(rng.randint(2, 4)):
        departs = rng.randrange(6 * 60, 22 * 60, 5)
        stops = rng.randint(0, arguments.get("max_stops", 2))
        options.append(
            {
                "flight": f"{rng.choice(AIRLINES)}{rng.randint(100, 999)}",
                "departs": f"{departs // 60:02d}:{departs % 60:02d}",
                "duration_minutes": rng.randrange(80, 720, 5) + 95 * stops,
                "stops": stops,
                "price_usd": rng.randrange(89, 1400),
            }
        )
    return options


def order_status(rng: random.Random, order_id: str) -> dict:
    status = rng.choice(["processing", "shipped", "out for delivery", "delayed in transit"])
    return {
        "order_id": order_id,
        "status": status,
        "carrier": rng.choice(["DHL", "UPS", "FedEx"]),
        "estimated_delivery": some_day(rng).isoformat(),
    }


def order_id(rng: random.Random) -> str:
    return f"{rng.choice(['AB', 'KX', 'MQ', 'ZT'])}-{rng.randrange(10**6):06d}"


# Each exchange returns (tool schema, user request, call arguments, tool result, final answer).
Exchange = tuple[dict, str, dict, object, str]


def weather_exchange(rng: random.Random) -> Exchange:
    city, unit = rng.choice(CITIES), rng.choice(["celsius", "fahrenheit"])
    request = rng.choice(
        [
            "What's the weather like in {} right now?",
            "Is it cold in {} today?",
            "Can you check the current weather in {}?",
        ]
    ).format(city)
    arguments = {"city": city, "unit": unit} if rng.random() < 0.5 else {"city": city}
    if "unit" in arguments:
        request += f" Give me the temperature in {unit}."
    report = weather(rng, city, arguments.get("unit", "celsius"))
    return WEATHER, request, arguments, report, f"Right now it is {describe_weather(report)}."


def currency_exchange(rng: random.Random) -> Exchange:
    amount, (source, target) = rng.randrange(5, 5000), rng.sample(list(USD_RATES), 2)
    request = rng.choice(["How much is {} {} in {}?", "Convert {} {} to {}, please."])
    converted = conversion(amount, source, target)
    answer = (
        f"{amount} {source} is about {converted['converted']:,.2f} {target} "
        f"(rate {converted['rate']})."
    )
    arguments = {"amount": amount, "from_currency": source, "to_currency": target}
    return CONVERT, request.format(amount, source, target), arguments, converted, answer


def flight_exchange(rng: random.Random) -> Exchange:
    origin, destination = rng.sample(CITIES, 2)
    day, max_stops = some_day(rng), rng.randint(0, 2)
    stops = {0: "nonstop", 1: "with at most one stop", 2: "with up to two stops"}[max_stops]
    request = f"Find me flights from {origin} to {destination} on {day:%A %d %B %Y}, {stops}."
    arguments = {
        "origin": AIRPORTS[origin],
        "destination": AIRPORTS[destination],
        "date": day.isoformat(),
        "max_stops": max_stops,
    }
    options = flights(rng, arguments)
    best = min(options, key=lambda f: f["price_usd"])
    answer = (
        f"I found {len(options)} flights. The cheapest is {best['flight']}, departing at "
        f"{best['departs']} with {best['stops']} stop(s), for ${best['price_usd']}."
    )
    return FLIGHTS, request, arguments, options, answer


def order_exchange(rng: random.Random) -> Exchange:
    order = order_id(rng)
    status = order_status(rng, order)
    request = rng.choice(["Where is my order {}?", "Can you track order {} for me?"]).format(order)
    answer = (
        f"Order {order} is {status['status']} with {status['carrier']}; estimated delivery "
        f"is {status['estimated_delivery']}."
    )
    return ORDER, request, {"order_id": order}, status, answer


def timer_exchange(rng: random.Random) -> Exchange:
    minutes, label = rng.randint(1, 180), rng.choice(["pasta", "laundry", "tea", "break", "bread"])
    request = f"Set a timer for {minutes} minutes for the {label}."
    timer = {"timer_id": f"t{rng.randrange(1000, 9999)}", "minutes": minutes, "label": label}
    return (
        TIMER,
        request,
        {"minutes": minutes, "label": label},
        timer,
        f"Done: a {minutes}-minute {label} timer is running.",
    )


def loan_exchange(rng: random.Random) -> Exchange:
    principal, rate, years = (
        rng.randrange(5000, 500000, 1000),
        rng.randrange(15, 90) / 10,
        rng.randint(2, 30),
    )
    monthly_rate, months = rate / 1200, years * 12
    payment = round(principal * monthly_rate / (1 - (1 + monthly_rate) ** -months), 2)
    loan = {"monthly_payment": payment, "total_interest": round(payment * months - principal, 2)}
    request = (
        f"What would my monthly payment be on a ${principal:,} loan at {rate}% over {years} years?"
    )
    answer = (
        f"The monthly payment would be ${payment:,.2f}, and you would pay "
        f"${loan['total_interest']:,.2f} in interest over {years} years."
    )
    arguments = {"principal": principal, "annual_rate_percent": rate, "years": years}
    return LOAN, request, arguments, loan, answer


def event_exchange(rng: random.Random) -> Exchange:
    title = rng.choice(["design review", "dentist appointment", "team sync", "lunch", "interview"])
    guests, day = rng.sample(PEOPLE, rng.randint(1, 3)), some_day(rng)
    start, minutes = rng.randrange(8 * 60, 18 * 60, 15), rng.choice([15, 30, 45, 60, 90])
    time = f"{start // 60:02d}:{start % 60:02d}"
    request = (
        f"Schedule a {minutes}-minute {title} with {' and '.join(guests)} "
        f"on {day:%d %B %Y} at {time}."
    )
    arguments = {
        "title": title,
        "date": day.isoformat(),
        "start_time": time,
        "duration_minutes": minutes,
        "attendees": [email(g) for g in guests],
    }
    event = {"event_id": f"evt_{rng.randrange(16**8):08x}", "status": "confirmed"}
    return (
        EVENT,
        request,
        arguments,
        event,
        f"Your {title} on {day:%d %B} at {time} is booked and invites were sent.",
    )


EXCHANGES: list[Callable[[random.Random], Exchange]] = [
    weather_exchange,
    currency_exchange,
    flight_exchange,
    order_exchange,
    timer_exchange,
    loan_exchange,
    event_exchange,
]
SCHEMAS = [WEATHER, CONVERT, FLIGHTS, ORDER, TIMER, LOAN, EVENT, EMAIL]


def tool_call_documents(rng: random.Random) -> Iterator[dict]:
    """One function-call exchange per chat; the tool list also offers 0-3 unrelated tools."""
    while True:
        schema, request, arguments, payload, answer = rng.choice(EXCHANGES)(rng)
        tools = [schema, *rng.sample([s for s in SCHEMAS if s is not schema], rng.randint(0, 3))]
        rng.shuffle(tools)
        name = schema["function"]["name"]
        yield {
            "tools": tools,
            "messages": [
                {"role": "user", "content": request},
                call("", (name, arguments)),
                result(name, payload),
                {"role": "assistant", "content": answer},
            ],
        }
