"""Generated ``agent`` transcripts: a user task, the assistant's plan, several tool calls with
their (simulated, self-consistent) results, and a final answer computed from those results."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Callable, Iterator

from mixq.corpus_tools import (
    AIRPORTS,
    CITIES,
    CONVERT,
    DATE,
    EMAIL,
    EVENT,
    FLIGHTS,
    ORDER,
    PEOPLE,
    TEXT,
    USD_RATES,
    WEATHER,
    call,
    conversion,
    describe_weather,
    email,
    flights,
    function,
    order_id,
    order_status,
    result,
    some_day,
    weather,
)

SYSTEM_PROMPTS = [
    "You are an agent that completes the user's task with the available tools. Make a plan, "
    "call tools one step at a time, and finish with a short final answer.",
    "You are a helpful assistant with tool access. Think step by step and use a tool whenever "
    "you need information you do not have.",
]
LIST_FILES = function(
    "list_files", "List the files in a directory with their sizes.", {"path": TEXT}, ["path"]
)
COUNT_MATCHES = function(
    "count_matches",
    "Count the lines of a file that match a regular expression.",
    {"path": TEXT, "pattern": TEXT},
    ["path", "pattern"],
)
READ_CSV = function(
    "read_csv", "Read a CSV file and return its rows as objects.", {"path": TEXT}, ["path"]
)
RUN_PYTHON = function(
    "run_python", "Run a Python snippet and return what it prints.", {"code": TEXT}, ["code"]
)
CALENDAR = function("get_calendar", "List the user's events on a date.", {"date": DATE}, ["date"])

Transcript = tuple[list[dict], list[dict]]  # (tools, messages after the system prompt)


def trip(rng: random.Random) -> Transcript:
    origin, destination = rng.sample(CITIES, 2)
    day = some_day(rng)
    report = weather(rng, destination)
    search = {
        "origin": AIRPORTS[origin],
        "destination": AIRPORTS[destination],
        "date": day.isoformat(),
        "max_stops": 0,
    }
    options = flights(rng, search)
    best = min(options, key=lambda f: f["price_usd"])
    warmth = report["temperature"]
    advice = (
        "pack a warm coat"
        if warmth < 10
        else "bring a jacket"
        if warmth < 20
        else "pack light clothes"
    )
    if "rain" in report["conditions"]:
        advice += " and an umbrella"
    return [WEATHER, FLIGHTS, EVENT], [
        {
            "role": "user",
            "content": f"I'm flying from {origin} to {destination} on {day:%d %B}. "
            "What's the weather there, and what's the cheapest nonstop flight?",
        },
        call(
            f"Plan:\n1. Check the current weather in {destination}.\n2. Search nonstop flights "
            f"{AIRPORTS[origin]} -> {AIRPORTS[destination]} on {day.isoformat()}.\n"
            "3. Recommend the cheapest one.",
            ("get_weather", {"city": destination}),
        ),
        result("get_weather", report),
        call(f"It's {describe_weather(report)}. Next, the flights.", ("search_flights", search)),
        result("search_flights", options),
        {
            "role": "assistant",
            "content": f"It's currently {describe_weather(report)}, so {advice}. "
            f"The cheapest nonstop flight is {best['flight']} at "
            f"{best['departs']} for ${best['price_usd']}.",
        },
    ]


def late_order(rng: random.Random) -> Transcript:
    order, address = order_id(rng), email(rng.choice(PEOPLE))
    status = order_status(rng, order)
    body = (
        f"Hello,\n\nyour order {order} is {status['status']} with {status['carrier']}. "
        f"The estimated delivery date is {status['estimated_delivery']}.\n\nBest regards"
    )
    message = {"to": address, "subject": f"Update on order {order}", "body": body}
    return [ORDER, EMAIL], [
        {
            "role": "user",
            "content": f"My order {order} still hasn't arrived. Can you check on it "
            f"and email me an update at {address}?",
        },
        call(
            "I'll look up the order first, then email the status.",
            ("get_order_status", {"order_id": order}),
        ),
        result("get_order_status", status),
        call(f"The order is {status['status']}. Sending the update now.", ("send_email", message)),
        result("send_email", {"status": "sent", "message_id": f"msg-{rng.randrange(10**6):06d}"}),
        {
            "role": "assistant",
            "content": f"Your order is {status['status']} with {status['carrier']} "
            f"(expected {status['estimated_delivery']}). I emailed the "
            f"details to {address}.",
        },
    ]


def error_logs(rng: random.Random) -> Transcript:
    app = rng.choice(["billing", "gateway", "scheduler", "webapp"])
    names = rng.sample(
        ["app.log", "worker.log", "cron.log", "access.log", "db.log"], rng.randint(2, 4)
    )
    counts = dict(zip(names, rng.sample(range(0, 400), len(names))))
    folder = f"/var/log/{app}"
    listing = {"files": [{"name": n, "size_bytes": rng.randrange(10**4, 10**7)} for n in names]}
    messages = [
        {"role": "user", "content": f"Which log file in {folder} has the most ERROR lines?"},
        call(
            "Plan: list the log files, count the ERROR lines in each, then compare.",
            ("list_files", {"path": folder}),
        ),
        result("list_files", listing),
    ]
    for name in names:
        path = f"{folder}/{name}"
        messages += [
            call(
                f"Counting errors in {name}.", ("count_matches", {"path": path, "pattern": "ERROR"})
            ),
            result("count_matches", {"path": path, "matches": counts[name]}),
        ]
    worst = max(names, key=counts.get)
    summary = ", ".join(f"{n}: {counts[n]}" for n in names)
    messages.append(
        {
            "role": "assistant",
            "content": f"{worst} has the most ERROR lines ({counts[worst]}). Counts: {summary}.",
        }
    )
    return [LIST_FILES, COUNT_MATCHES, READ_CSV], messages


TOTALS_SCRIPT = """import csv
from collections import defaultdict

totals = defaultdict(float)
with open(%r) as f:
    for row in csv.DictReader(f):
        totals[row["category"]] += float(row["amount"])
for name, total in sorted(totals.items(), key=lambda item: -item[1]):
    print(f"{name}: {total:.2f}")
print(f"TOTAL: {sum(totals.values()):.2f}")
"""


def expenses(rng: random.Random) -> Transcript:
    path = f"/home/{rng.choice(PEOPLE).lower()}/expenses-{rng.randint(1, 12):02d}.csv"
    categories = rng.sample(["rent", "groceries", "transport", "dining", "utilities", "books"], 4)
    rows = [
        {
            "date": some_day(rng).isoformat(),
            "category": rng.choice(categories),
            "amount": f"{rng.randrange(300, 90000) / 100:.2f}",
        }
        for _ in range(rng.randint(5, 10))
    ]
    totals: defaultdict[str, float] = defaultdict(float)
    for row in rows:
        totals[row["category"]] += float(row["amount"])
    ranked = sorted(totals.items(), key=lambda item: -item[1])  # what TOTALS_SCRIPT prints
    printed = "".join(f"{name}: {total:.2f}\n" for name, total in ranked)
    printed += f"TOTAL: {sum(totals.values()):.2f}\n"
    top = max(totals, key=totals.get)
    return [READ_CSV, RUN_PYTHON, LIST_FILES], [
        {
            "role": "user",
            "content": f"My expense export is at {path}. Which category did I spend "
            "the most on, and how much did I spend in total?",
        },
        call("First I'll look at the file's columns.", ("read_csv", {"path": path})),
        result("read_csv", rows),
        call(
            "It has date, category and amount columns. I'll total the amounts per category.",
            ("run_python", {"code": TOTALS_SCRIPT % path}),
        ),
        result("run_python", {"stdout": printed, "exit_code": 0}),
        {
            "role": "assistant",
            "content": f"You spent the most on {top} ({totals[top]:.2f}); the "
            f"total across {len(rows)} expenses is {sum(totals.values()):.2f}.",
        },
    ]


def clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def meeting(rng: random.Random) -> Transcript:
    day, guest = some_day(rng), rng.choice(PEOPLE)
    length, title = (
        rng.choice([30, 45, 60, 90]),
        rng.choice(["project kickoff", "1:1", "budget review"]),
    )
    slots, start = [], 9 * 60
    for _ in range(rng.randint(1, 4)):  # meetings end by 15:00, so 15:00-17:00 is always free
        start += rng.choice([0, 0, 30, 60])
        end = start + rng.choice([30, 60, 90])
        if end > 15 * 60:
            break
        slots.append((start, end))
        start = end
    free = 9 * 60
    for start, end in slots:
        if start - free >= length:
            break
        free = end
    busy = [
        {
            "title": rng.choice(["standup", "vendor call", "review", "focus time"]),
            "start": clock(start),
            "end": clock(end),
        }
        for start, end in slots
    ]
    booking = {
        "title": title,
        "date": day.isoformat(),
        "start_time": clock(free),
        "duration_minutes": length,
        "attendees": [email(guest)],
    }
    return [CALENDAR, EVENT, EMAIL], [
        {
            "role": "user",
            "content": f"Find the first free {length}-minute slot on {day:%d %B} between "
            f"09:00 and 17:00 and book a {title} with {guest} ({email(guest)}).",
        },
        call(
            "Plan: read that day's calendar, find the first gap that is long enough, then book it.",
            ("get_calendar", {"date": day.isoformat()}),
        ),
        result("get_calendar", {"date": day.isoformat(), "events": busy}),
        call(
            f"The first free {length}-minute gap starts at {clock(free)}.",
            ("create_event", booking),
        ),
        result(
            "create_event", {"event_id": f"evt_{rng.randrange(16**8):08x}", "status": "confirmed"}
        ),
        {
            "role": "assistant",
            "content": f"Booked: {title} with {guest} on {day:%d %B}, "
            f"{clock(free)}-{clock(free + length)}.",
        },
    ]


def trip_budget(rng: random.Random) -> Transcript:
    home, *spent = rng.sample(list(USD_RATES), 4)
    amounts = [rng.randrange(20, 3000) for _ in spent]
    results = [conversion(a, c, home) for a, c in zip(amounts, spent)]
    calls = [
        ("convert_currency", {"amount": a, "from_currency": c, "to_currency": home})
        for a, c in zip(amounts, spent)
    ]
    total = round(sum(r["converted"] for r in results), 2)
    listed = ", ".join(f"{a} {c}" for a, c in zip(amounts, spent))
    return [CONVERT], [
        {
            "role": "user",
            "content": f"On my trip I spent {listed}. What is that in {home} altogether?",
        },
        call(f"I'll convert each amount to {home}, then add them up.", *calls),
        *(result("convert_currency", r) for r in results),
        {
            "role": "assistant",
            "content": " + ".join(f"{r['converted']:,.2f}" for r in results)
            + f" = {total:,.2f} {home} in total.",
        },
    ]


SCENARIOS: list[Callable[[random.Random], Transcript]] = [
    trip,
    late_order,
    error_logs,
    expenses,
    meeting,
    trip_budget,
]


def agent_documents(rng: random.Random) -> Iterator[dict]:
    """Multi-step tool-using transcripts from varied scenarios, under an agent system prompt."""
    while True:
        tools, messages = rng.choice(SCENARIOS)(rng)
        yield {
            "tools": tools,
            "messages": [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, *messages],
        }
