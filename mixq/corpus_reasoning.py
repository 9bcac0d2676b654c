"""Generated ``reasoning`` chats: arithmetic word problems (rates, percentages, sums, unit
conversions...) with step-by-step solutions whose numbers are computed, so they are right."""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Callable, Iterator

NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Diego",
    "Elif",
    "Farah",
    "Goran",
    "Hana",
    "Ivan",
    "Jia",
    "Kofi",
    "Lena",
    "Mateo",
    "Nadia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tariq",
    "Uma",
    "Wen",
]


def number(value: Fraction | int) -> str:
    """An exact value as an integer or a decimal with at most two places."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.2f}".rstrip("0")


def money(value: Fraction | int) -> str:
    return f"${float(value):,.2f}"


def cents(amount: int) -> str:
    return money(Fraction(amount, 100))


# Each problem maker returns (question, solution steps, final answer).
Problem = tuple[str, list[str], str]


def travel(rng: random.Random) -> Problem:
    speed, hours, later = rng.randrange(30, 125, 5), rng.randint(2, 6), rng.randint(2, 9)
    vehicle = rng.choice(["train", "bus", "car", "ferry", "truck", "cyclist"])
    return (
        f"A {vehicle} covers {speed * hours} km in {hours} hours. At the same speed, how far "
        f"does it travel in {later} hours?",
        [
            f"Speed = distance / time = {speed * hours} km / {hours} h = {speed} km/h.",
            f"Distance in {later} hours = {speed} km/h x {later} h = {speed * later} km.",
        ],
        f"{speed * later} km",
    )


def production(rng: random.Random) -> Problem:
    rate, minutes = rng.randint(3, 40), rng.randrange(30, 400, 5)
    machine, unit = rng.choice(
        [
            ("printer", "pages"),
            ("bottling line", "bottles"),
            ("bakery oven", "loaves"),
            ("3D printer farm", "parts"),
            ("packing robot", "boxes"),
        ]
    )
    return (
        f"A {machine} produces {rate} {unit} per minute. How long does it take to produce "
        f"{rate * minutes} {unit}? Give the answer in hours and minutes.",
        [
            f"Time = {rate * minutes} {unit} / {rate} {unit} per minute = {minutes} minutes.",
            f"{minutes} minutes = {minutes // 60} h and {minutes % 60} min (60 minutes per hour).",
        ],
        f"{minutes // 60} hours {minutes % 60} minutes",
    )


def discount(rng: random.Random) -> Problem:
    price, percent = rng.randrange(12, 480), rng.choice([10, 15, 20, 25, 30, 35, 40, 50])
    item = rng.choice(["jacket", "lamp", "backpack", "pair of boots", "desk chair", "kettle"])
    off = Fraction(price * percent, 100)
    return (
        f"A {item} normally costs ${price}. The store takes {percent}% off. "
        "What is the sale price?",
        [
            f"Discount = {percent}% of ${price} = {price} x {percent} / 100 = {money(off)}.",
            f"Sale price = ${price} - {money(off)} = {money(price - off)}.",
        ],
        money(price - off),
    )


def growth(rng: random.Random) -> Problem:
    start, percent = rng.randrange(1200, 90000, 100), rng.randint(2, 30)
    subject = rng.choice(
        ["A town's population", "A library's collection of books", "A farm's flock"]
    )
    increase = start * percent // 100
    return (
        f"{subject} was {start} last year and grew by {percent}%. How large is it now?",
        [
            f"Increase = {percent}% of {start} = {start} x {percent} / 100 = {increase}.",
            f"New size = {start} + {increase} = {start + increase}.",
        ],
        str(start + increase),
    )


def share(rng: random.Random) -> Problem:
    total, percent = rng.randrange(40, 1000, 20), rng.randrange(5, 96, 5)
    things, kind = rng.choice(
        [("students", "in the choir"), ("trees", "oaks"), ("emails", "spam"), ("cars", "electric")]
    )
    part = total * percent // 100
    return (
        f"There are {total} {things}, and {percent}% of them are {kind}. How many are not {kind}?",
        [
            f"{percent}% of {total} = {total} x {percent} / 100 = {part} are {kind}.",
            f"Not {kind}: {total} - {part} = {total - part}.",
        ],
        str(total - part),
    )


def change(rng: random.Random) -> Problem:
    (first, p1), (second, p2) = rng.sample(
        [
            ("notebooks", 245),
            ("pens", 120),
            ("apples", 65),
            ("coffees", 380),
            ("stamps", 95),
            ("bagels", 175),
        ],
        2,
    )
    a, b, name = rng.randint(2, 6), rng.randint(1, 5), rng.choice(NAMES)
    total = a * p1 + b * p2
    bill = next(note for note in (10, 20, 50, 100) if note * 100 >= total)
    due = bill * 100 - total
    return (
        f"{name} buys {a} {first} at {cents(p1)} each and {b} {second} at {cents(p2)} each, "
        f"and pays with a ${bill} note. How much change is due?",
        [
            f"{first.capitalize()}: {a} x {cents(p1)} = {cents(a * p1)}.",
            f"{second.capitalize()}: {b} x {cents(p2)} = {cents(b * p2)}.",
            f"Total = {cents(total)}; change = ${bill} - {cents(total)} = {cents(due)}.",
        ],
        cents(due),
    )


UNIT_QUESTIONS = [
    ("{name} ran {value} km this morning. How many metres is that?", "km", "m", 1000),
    ("A bag of flour weighs {value} kg. How many grams is that?", "kg", "g", 1000),
    ("A water tank holds {value} litres. How many millilitres is that?", "L", "mL", 1000),
    ("A flight lasts {value} hours. How many minutes is that?", "h", "min", 60),
    ("A shelf is {value} feet long. How many inches is that?", "ft", "in", 12),
    ("A festival lasts {value} days. How many hours is that?", "days", "h", 24),
]


def conversion(rng: random.Random) -> Problem:
    question, big, small, factor = rng.choice(UNIT_QUESTIONS)
    value = Fraction(rng.randint(3, 95), rng.choice([1, 2, 4]))
    return (
        question.format(name=rng.choice(NAMES), value=number(value)),
        [
            f"1 {big} = {factor} {small}.",
            f"{number(value)} x {factor} = {number(value * factor)} {small}.",
        ],
        f"{number(value * factor)} {small}",
    )


def average(rng: random.Random) -> Problem:
    scores = [rng.randint(55, 99) for _ in range(rng.randint(3, 6))]
    scores[-1] -= sum(scores) % len(scores)
    mean = sum(scores) // len(scores)
    return (
        f"{rng.choice(NAMES)} scored {', '.join(map(str, scores[:-1]))} and {scores[-1]} on "
        f"{len(scores)} quizzes. What is the average score?",
        [
            f"Sum = {' + '.join(map(str, scores))} = {sum(scores)}.",
            f"Average = {sum(scores)} / {len(scores)} = {mean}.",
        ],
        str(mean),
    )


def ratio(rng: random.Random) -> Problem:
    a, b, k = rng.randint(1, 5), rng.randint(2, 7), rng.randint(2, 30)
    first, second, unit = rng.choice(
        [("cement", "sand", "kg"), ("juice", "water", "mL"), ("blue paint", "white paint", "L")]
    )
    return (
        f"A mix uses {first} and {second} in the ratio {a}:{b}. How much {second} is in "
        f"{(a + b) * k} {unit} of the mix?",
        [
            f"The ratio has {a} + {b} = {a + b} parts, "
            f"so one part = {(a + b) * k} / {a + b} = {k} {unit}.",
            f"{second.capitalize()} = {b} parts x {k} {unit} = {b * k} {unit}.",
        ],
        f"{b * k} {unit}",
    )


def clock(rng: random.Random) -> Problem:
    start, length = rng.randrange(6 * 60, 21 * 60, 5), rng.randrange(25, 240, 5)
    end = (start + length) % (24 * 60)
    event = rng.choice(["film", "concert", "train journey", "workshop", "football match"])
    return (
        f"A {event} starts at {start // 60:02d}:{start % 60:02d} and lasts {length} minutes. "
        "At what time does it end?",
        [
            f"{length} minutes = {length // 60} h {length % 60} min.",
            f"{start // 60:02d}:{start % 60:02d} + {length // 60} h {length % 60} min = "
            f"{end // 60:02d}:{end % 60:02d}.",
        ],
        f"{end // 60:02d}:{end % 60:02d}",
    )


def temperature(rng: random.Random) -> Problem:
    celsius = rng.randrange(-30, 45, 5)
    fahrenheit = celsius * 9 // 5 + 32
    return (
        f"The forecast says {celsius} degrees Celsius. What is that in degrees Fahrenheit?",
        [
            "F = C x 9 / 5 + 32.",
            f"{celsius} x 9 / 5 = {celsius * 9 // 5}, and {celsius * 9 // 5} + 32 = {fahrenheit}.",
        ],
        f"{fahrenheit} degrees Fahrenheit",
    )


def split_bill(rng: random.Random) -> Problem:
    people, bill, tip = rng.randint(2, 8), rng.randrange(30, 400), rng.choice([10, 12, 15, 18, 20])
    total = Fraction(bill * (100 + tip), 100)
    return (
        f"{people} friends share a restaurant bill of ${bill} and add a {tip}% tip. How much does "
        "each person pay, to the nearest cent?",
        [
            f"Tip = {tip}% of ${bill} = {cents(bill * tip)}; total = {money(total)}.",
            f"Each person pays {money(total)} / {people} = {money(total / people)}.",
        ],
        money(total / people),
    )


PROBLEMS: list[Callable[[random.Random], Problem]] = [
    travel,
    production,
    discount,
    growth,
    share,
    change,
    conversion,
    average,
    ratio,
    clock,
    temperature,
    split_bill,
]
TUTORS = [
    "You are a patient math tutor. Show your reasoning before the answer.",
    "Solve word problems carefully, one step at a time, and state the final answer last.",
]


def worked_solution(rng: random.Random, steps: list[str], answer: str) -> str:
    intro = rng.choice(["Let's solve this step by step.", "Here is the working.", "Step by step:"])
    numbered = "\n".join(f"{i}. {step}" for i, step in enumerate(steps, 1))
    return f"{intro}\n\n{numbered}\n\nFinal answer: {answer}"


def reasoning_documents(rng: random.Random) -> Iterator[dict]:
    """Word problems (rates, percentages, sums, unit conversions...) with worked solutions;
    some chats have a tutor system prompt or a follow-up problem."""
    while True:
        messages = [{"role": "system", "content": rng.choice(TUTORS)}] if rng.random() < 0.3 else []
        for turn in range(1 if rng.random() < 0.7 else 2):
            question, steps, answer = rng.choice(PROBLEMS)(rng)
            prefix = "Here's another one. " if turn else ""
            messages += [
                {"role": "user", "content": prefix + question},
                {"role": "assistant", "content": worked_solution(rng, steps, answer)},
            ]
        yield {"messages": messages}
