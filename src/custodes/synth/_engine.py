"""The generator: tables compiled once per process, then a tight loop per chunk of people.

Everything random comes from one `random.Random(seed)`, so the seed (with the Faker
release that supplies the name and place lists) fixes every byte of the output.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, repeat
from random import Random
from typing import Any, Final

from custodes.records.idnumber import PROVINCE_CODES, check_char
from custodes.synth import _tables as T

REFERENCE_DATE: Final = dt.date(2024, 1, 1)
MAX_AGE: Final = 95
CHUNK_PEOPLE: Final = 1000
CASE_WINDOW_DAYS: Final = 7305  # cases opened in the twenty years before the reference date
DELIVERY_WINDOW_DAYS: Final = 730

# References reach back past the current chunk through a fixed-size uniform sample of
# earlier people, which keeps memory flat however many people are generated.
RESERVOIR_SIZE: Final = 4096
EARLIER_SHARE: Final = 0.25
MOVED_SHARE: Final = 0.2  # live outside the county of birth
APARTMENT_SHARE: Final = 0.6
WORKPLACE_SHARE: Final = 0.15  # parcels sent to work rather than home
NARRATIVE_SHARE: Final = 0.98
DELIVERY_DATE_SHARE: Final = 0.99
PICK_TRIES: Final = 16
LEAD_AGE: Final = 18  # people acting in a case's lead sentence drive, invest, rent
RECIPIENT_AGE: Final = 14

# Weighted draws index a table in which each value appears in proportion to its weight;
# with a power-of-two size a draw is one `getrandbits`, far cheaper than a bisection.
SMALL_BITS: Final = 14  # shares given to a tenth of a percent or coarser
LARGE_BITS: Final = 17  # names, whose rarest entries weigh a thousandth of a percent
STREET_BITS: Final = 12
PREFIX_BITS: Final = 10

# Sequence numbers 000-999 pair up as (even: woman, odd: man); a county gets up to 500
# pairs, in proportion to its province's population per county.
_SEQ_HALVES: Final = 500
_GOLDEN: Final = 0x9E3779B97F4A7C15
_MASK64: Final = (1 << 64) - 1
_WAYBILL_SPACE: Final = 10**12

Record = dict[str, Any]
Person = tuple[str, str, str | None, str | None, int, int]  # id, name, phone, address, t, home
# Category, lead sentence, the roles it names in order, and their minimum ages in days.
CaseTemplate = tuple[str, str, tuple[str, ...], tuple[int, ...]]


def _expand(pairs: Iterable[tuple[Any, float]], bits: int = SMALL_BITS) -> tuple[Any, ...]:
    """2**bits entries, each value repeated in proportion to its weight (at least once)."""
    size = 1 << bits
    values, weights = zip(*pairs, strict=True)
    total = sum(weights)
    exact = [w * size / total for w in weights]
    counts = [max(1, int(e)) for e in exact]
    by_remainder = sorted(range(len(counts)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in range(size - sum(counts)):
        counts[by_remainder[i % len(counts)]] += 1
    for _ in range(sum(counts) - size):
        counts[counts.index(max(counts))] -= 1
    return tuple(chain.from_iterable(map(repeat, values, counts)))


def _uniform(values: Sequence[Any], bits: int) -> tuple[Any, ...]:
    return _expand(((v, 1.0) for v in values), bits)


@dataclass(frozen=True, slots=True)
class _Tables:
    # By t, days before the reference date.
    day_iso: tuple[str, ...]
    day_compact: tuple[str, ...]
    day_age: tuple[int, ...]
    day_chinese: tuple[str, ...]  # only within the case window
    # A birth is t = 1 + bisect(birth_cum, random() * birth_total), by the age pyramid;
    # nobody is born on the reference date itself, so a case can always follow a birth.
    birth_cum: tuple[float, ...]
    birth_total: float
    # By county (area) index.
    area_code: tuple[str, ...]
    area_start: tuple[int, ...]
    area_end: tuple[int, ...]
    area_birth_place: tuple[str, ...]
    area_address: tuple[str, ...]  # province + city (+ district)
    area_place: tuple[str, ...]  # city (+ district), for narratives
    area_ethnicity: tuple[tuple[str, ...], ...]
    halves_total: int
    # By age, or age * 2 + male.
    age_education: tuple[tuple[str, ...], ...]
    age_marital: tuple[tuple[str, ...], ...]
    age_phone: tuple[float, ...]
    surname: tuple[str, ...]
    given: tuple[tuple[str, ...], tuple[str, ...]]  # female, male
    phone_prefix: tuple[str, ...]
    streets: tuple[str, ...]
    house_numbers: tuple[str, ...]  # 256
    apartments: tuple[str, ...]  # 2**SMALL_BITS
    seq3: tuple[str, ...]
    missing: tuple[str, ...]  # which optional field a record lacks
    missing_share: float
    case_template: tuple[CaseTemplate, ...]
    fallback_template: CaseTemplate
    persons_per_case: tuple[int, ...]
    extra_role: tuple[str, ...]
    min_days: dict[str, int]


def _days_for_age(years: int) -> int:
    return math.ceil(years * 365.25) + 1


def _by_age(table: Sequence[tuple[int, tuple[tuple[str, float], ...]]]) -> list[tuple[str, ...]]:
    expanded = [_expand(pairs) for _, pairs in table]
    starts = [start for start, _ in table]
    return [expanded[bisect_right(starts, age) - 1] for age in range(MAX_AGE + 1)]


def _counties() -> list[str]:
    from faker.providers.ssn.zh_CN import Provider as SsnProvider

    # County-level codes only: a code ending in 00 names a province or prefecture.
    return [
        code
        for code in SsnProvider.area_codes
        if not code.endswith("00") and code[:2] in PROVINCE_CODES and code[:2] in T.REGIONS
    ]


def _districts() -> tuple[str, ...]:
    from faker.providers.address.zh_CN import Provider as AddressProvider

    names = dict.fromkeys(d for d in AddressProvider.districts if not d.endswith("区"))
    return tuple(names)


def _county_name(code: str, districts: tuple[str, ...]) -> str:
    # Real codes number urban districts 01-20, counties 21-80, county-level cities 81-99.
    serial = int(code[4:])
    suffix = "区" if serial <= 20 else "县" if serial <= 80 else "市"
    # Any stable spread of Faker's district names over the counties will do.
    return districts[(int(code) * 7919) % len(districts)] + suffix


@functools.cache
def _tables() -> _Tables:
    """Every lookup table, built on first use and shared by all populations."""
    from faker.providers.address.zh_CN import Provider as AddressProvider
    from faker.providers.person.zh_CN import Provider as PersonProvider
    from faker.providers.phone_number.zh_CN import Provider as PhoneProvider

    ref = REFERENCE_DATE.toordinal()
    oldest = REFERENCE_DATE.replace(year=REFERENCE_DATE.year - MAX_AGE - 1).toordinal() + 1
    days = [dt.date.fromordinal(ref - t) for t in range(ref - oldest + 1)]
    iso = tuple(d.isoformat() for d in days)
    compact = tuple(d.replace("-", "") for d in iso)

    def age_at_reference(born: dt.date) -> int:
        had_birthday = (REFERENCE_DATE.month, REFERENCE_DATE.day) >= (born.month, born.day)
        return REFERENCE_DATE.year - born.year - (0 if had_birthday else 1)

    ages = tuple(age_at_reference(d) for d in days)
    per_year = [b / 5 for b in T.AGE_BANDS for _ in range(5)] + [T.AGE_95_WEIGHT]
    birth_cum = tuple(accumulate(per_year[ages[t]] for t in range(1, len(days))))

    counties = _counties()
    districts = _districts()
    per_county = dict.fromkeys(T.REGIONS, 0)
    for code in counties:
        per_county[code[:2]] += 1
    density = {p: T.REGIONS[p][0] / n for p, n in per_county.items() if n}
    densest = max(density.values())
    halves = [max(1, round(_SEQ_HALVES * density[c[:2]] / densest)) for c in counties]
    ends = tuple(accumulate(halves))

    birth_places, addresses, places = [], [], []
    for code in counties:
        province = T.PROVINCES[code[:2]]
        cities = T.REGIONS[code[:2]][1]
        city = cities[int(code[2:4]) % len(cities)]
        district = "" if code[:2] in T.MUNICIPALITIES else _county_name(code, districts)
        birth_places.append(province + city)
        addresses.append(province + city + district)
        places.append(city + district)

    shares = {p: T.ETHNICITY.get(p, T.ETHNICITY_DEFAULT) for p in T.REGIONS}
    expanded = {pairs: _expand(pairs) for pairs in set(shares.values())}
    ethnicity = {p: expanded[pairs] for p, pairs in shares.items()}
    by_age = _by_age(T.MARITAL_BY_AGE)
    single = _expand([("single", 1.0)])
    marital = [
        by_age[age] if age >= T.LEGAL_MARRIAGE_AGE[gender] else single
        for age in range(MAX_AGE + 1)
        for gender in ("female", "male")
    ]
    phone_starts = [a for a, _ in T.PHONE_BY_AGE]
    age_phone = tuple(
        T.PHONE_BY_AGE[bisect_right(phone_starts, a) - 1][1] for a in range(MAX_AGE + 1)
    )

    roots = T.STREET_ROOTS + tuple(dict.fromkeys(AddressProvider.cities))
    suffixes = tuple(AddressProvider.street_suffixes) + T.EXTRA_STREET_SUFFIXES
    apartments = tuple(
        f"{b}栋{u}单元{f}{r:02d}室"
        for b in range(1, 33)
        for u in range(1, 5)
        for f in range(1, 33)
        for r in range(1, 5)
    )

    min_days = {role: _days_for_age(age) for role, age in T.MIN_AGE_FOR_ROLE.items()}
    lead_days = _days_for_age(LEAD_AGE)
    templates: list[tuple[CaseTemplate, float]] = []
    for category, weight, sentences in T.CASE_CATEGORIES:
        for sentence, roles in sentences:
            needs = tuple(max(min_days[r], lead_days) for r in roles)
            templates.append(((category, sentence, roles, needs), weight / len(sentences)))
    first_category, _, first_sentences = T.CASE_CATEGORIES[0]
    sentence, roles = first_sentences[0]
    fallback = (first_category, sentence, roles, tuple(min_days[r] for r in roles))

    return _Tables(
        day_iso=iso,
        day_compact=compact,
        day_age=ages,
        day_chinese=tuple(f"{d.year}年{d.month}月{d.day}日" for d in days[:CASE_WINDOW_DAYS]),
        birth_cum=birth_cum,
        birth_total=birth_cum[-1],
        area_code=tuple(counties),
        area_start=tuple(e - h for e, h in zip(ends, halves, strict=True)),
        area_end=ends,
        area_birth_place=tuple(birth_places),
        area_address=tuple(addresses),
        area_place=tuple(places),
        area_ethnicity=tuple(ethnicity[c[:2]] for c in counties),
        halves_total=ends[-1],
        age_education=tuple(_by_age(T.EDUCATION_BY_AGE)),
        age_marital=tuple(marital),
        age_phone=age_phone,
        surname=_expand(PersonProvider.last_names.items(), LARGE_BITS),
        given=(
            _given_names(PersonProvider.first_names_female),
            _given_names(PersonProvider.first_names_male),
        ),
        phone_prefix=_uniform([str(p) for p in PhoneProvider.phonenumber_prefixes], PREFIX_BITS),
        streets=_uniform([r + s for r in roots for s in suffixes], STREET_BITS),
        house_numbers=tuple(f"{n}号" for n in range(1, 257)),
        apartments=apartments,
        seq3=tuple(f"{i:03d}" for i in range(1000)),
        missing=_expand(T.MISSING.items()),
        missing_share=sum(T.MISSING.values()),
        case_template=_expand(templates),
        fallback_template=fallback,
        persons_per_case=_expand(T.PERSONS_PER_CASE),
        extra_role=_expand(T.EXTRA_ROLES),
        min_days=min_days,
    )


def _given_names(listed: Sequence[str]) -> tuple[str, ...]:
    # One character, a listed two-character name, or two listed characters together.
    singles = [n for n in listed if len(n) == 1]
    doubles = [n for n in listed if len(n) == 2]
    pairs = [a + b for a in singles for b in singles if a != b]
    return _expand(
        [(n, 0.40 / len(singles)) for n in singles]
        + [(n, 0.15 / len(doubles)) for n in doubles]
        + [(n, 0.45 / len(pairs)) for n in pairs],
        LARGE_BITS,
    )


def _coprime(rng: Random, modulus: int) -> int:
    """A random multiplier coprime to `modulus`, so that k -> m*k + c permutes residues."""
    m = modulus // 4 + int(rng.random() * (modulus // 2))
    while math.gcd(m, modulus) != 1:
        m += 1
    return m


class Population:
    """One deterministic stream of people, and the cases and deliveries naming them."""

    def __init__(self, seed: int, cases_per_person: float, deliveries_per_person: float) -> None:
        self._t = _tables()
        self._rng = Random(seed)  # noqa: S311 -- synthetic data, reproducible on purpose
        rng = self._rng
        self._case_rate = cases_per_person
        self._delivery_rate = deliveries_per_person
        # National IDs are unique by construction. The people born on day t with gender g
        # walk one orbit of j -> j + step (mod halves_total) from a start hashed from
        # (t, g); j names a county and a sequence number, and the step is coprime to the
        # modulus, so no (county, day, sequence) repeats before halves_total such people.
        self._id_step = _coprime(rng, self._t.halves_total)
        self._id_salt = int(rng.random() * (1 << 53))
        self._id_next = [-1] * (2 * len(self._t.day_iso))
        self._waybill_mult = _coprime(rng, _WAYBILL_SPACE)
        self._waybill_add = int(rng.random() * _WAYBILL_SPACE)
        self._waybills = 0
        self._case_counters: dict[int, int] = {}
        self._reservoir: list[Person] = []
        self._seen = 0
        self._case_carry = 0.0
        self._delivery_carry = 0.0

    def chunks(self, count: int) -> Iterator[list[Record]]:
        """Lists of records: a chunk of people, then the records that name them."""
        done = 0
        while done < count:
            n = min(CHUNK_PEOPLE, count - done)
            records, people = self._people(n)
            self._case_carry += self._case_rate * n
            cases = int(self._case_carry)
            self._case_carry -= cases
            self._delivery_carry += self._delivery_rate * n
            deliveries = int(self._delivery_carry)
            self._delivery_carry -= deliveries
            records.extend(self._case(people) for _ in range(cases))
            records.extend(self._delivery(people) for _ in range(deliveries))
            self._remember(people)
            done += n
            yield records

    def _people(self, n: int) -> tuple[list[Record], list[Person]]:
        # The hot loop: every table is bound to a local and every weighted draw is an
        # index into an expanded table, which is what makes 50,000+ people a second.
        tb = self._t
        rand, bits = self._rng.random, self._rng.getrandbits
        day_iso, day_compact, day_age = tb.day_iso, tb.day_compact, tb.day_age
        birth_cum, birth_total, birth_hi = tb.birth_cum, tb.birth_total, len(tb.birth_cum) - 1
        surname, given = tb.surname, tb.given
        codes, starts, ends = tb.area_code, tb.area_start, tb.area_end
        halves_total = tb.halves_total
        birth_places, addr_prefix = tb.area_birth_place, tb.area_address
        ethnicity, education, marital = tb.area_ethnicity, tb.age_education, tb.age_marital
        phone_p, prefixes = tb.age_phone, tb.phone_prefix
        streets, numbers, apartments = tb.streets, tb.house_numbers, tb.apartments
        seq3 = tb.seq3
        missing, missing_share = tb.missing, tb.missing_share
        id_next, step, salt = self._id_next, self._id_step, self._id_salt
        male_share, moved_share, apartment_share = T.MALE_SHARE, MOVED_SHARE, APARTMENT_SHARE

        records: list[Record] = []
        people: list[Person] = []
        for _ in range(n):
            male = 1 if rand() < male_share else 0
            t = bisect_right(birth_cum, rand() * birth_total, 0, birth_hi) + 1
            age = day_age[t]

            key = (t << 1) | male
            j = id_next[key]
            if j < 0:
                j = ((((key ^ salt) * _GOLDEN) & _MASK64) >> 24) % halves_total
            following = j + step
            id_next[key] = following - halves_total if following >= halves_total else following
            area = bisect_right(ends, j)
            seq = ((j - starts[area]) << 1) | male
            body = codes[area] + day_compact[t] + seq3[seq]
            national_id = body + check_char(body)

            name = surname[bits(LARGE_BITS)] + given[male][bits(LARGE_BITS)]
            home = bisect_right(ends, int(rand() * halves_total)) if rand() < moved_share else area
            street_address = addr_prefix[home] + streets[bits(STREET_BITS)] + numbers[bits(8)]
            if rand() < apartment_share:
                street_address += apartments[bits(SMALL_BITS)]
            if rand() < phone_p[age]:
                phone: str | None = f"{prefixes[bits(PREFIX_BITS)]}{int(rand() * 1e8):08d}"
                record: Record = {
                    "type": "person",
                    "name": name,
                    "national_id": national_id,
                    "phone": phone,
                    "gender": "male" if male else "female",
                    "birth_date": day_iso[t],
                    "birth_place": birth_places[area],
                    "ethnicity": ethnicity[area][bits(SMALL_BITS)],
                    "education": education[age][bits(SMALL_BITS)],
                    "marital_status": marital[(age << 1) | male][bits(SMALL_BITS)],
                    "address": street_address,
                }
            else:
                phone = None
                record = {
                    "type": "person",
                    "name": name,
                    "national_id": national_id,
                    "gender": "male" if male else "female",
                    "birth_date": day_iso[t],
                    "birth_place": birth_places[area],
                    "ethnicity": ethnicity[area][bits(SMALL_BITS)],
                    "education": education[age][bits(SMALL_BITS)],
                    "marital_status": marital[(age << 1) | male][bits(SMALL_BITS)],
                    "address": street_address,
                }
            # At most one other optional field is missing, each at its own rate.
            address: str | None = street_address
            if rand() < missing_share:
                absent = missing[bits(SMALL_BITS)]
                del record[absent]
                if absent == "address":
                    address = None
            records.append(record)
            people.append((national_id, name, phone, address, t, home))
        return records, people

    def _remember(self, people: list[Person]) -> None:
        """Reservoir sampling: every earlier person is equally likely to be kept."""
        rand = self._rng.random
        reservoir = self._reservoir
        for person in people:
            self._seen += 1
            if len(reservoir) < RESERVOIR_SIZE:
                reservoir.append(person)
            else:
                slot = int(rand() * self._seen)
                if slot < RESERVOIR_SIZE:
                    reservoir[slot] = person

    def _pick(self, people: list[Person]) -> Person:
        rand = self._rng.random
        if rand() < EARLIER_SHARE and self._reservoir:
            reservoir = self._reservoir
            return reservoir[int(rand() * len(reservoir))]
        return people[int(rand() * len(people))]

    def _case(self, people: list[Person]) -> Record:
        tb = self._t
        rand, bits = self._rng.random, self._rng.getrandbits
        for _ in range(3):
            category, sentence, roles, needs = tb.case_template[bits(SMALL_BITS)]
            extra = tuple(
                tb.extra_role[bits(SMALL_BITS)]
                for _ in range(tb.persons_per_case[bits(SMALL_BITS)] - len(roles))
            )
            cast = self._cast(people, roles, needs, extra)
            if cast is not None:
                break
        else:
            # A tiny population of small children fills no other template.
            category, sentence, roles, needs = tb.fallback_template
            extra = ()
            cast = self._cast(people, roles, needs, extra)
            assert cast is not None  # a victim needs only to have been born
        named, latest = cast
        opened = int(rand() * (min(latest, CASE_WINDOW_DAYS - 1) + 1))

        home = named[0][0][5]
        year = int(tb.day_compact[opened][:4])
        counter_key = home * 128 + REFERENCE_DATE.year - year
        sequence = self._case_counters.get(counter_key, 0) + 1
        self._case_counters[counter_key] = sequence

        record: Record = {
            "type": "case",
            "case_no": f"A{tb.area_code[home]}{year}{sequence:06d}",
            "opened_on": tb.day_iso[opened],
            "category": category,
        }
        if rand() < NARRATIVE_SHARE:
            place = (
                tb.area_place[home]
                + tb.streets[bits(STREET_BITS)]
                + T.PLACE_SUFFIXES[int(rand() * len(T.PLACE_SUFFIXES))]
            )
            lead = sentence.format(
                *(p[1] for p, _ in named[: len(roles)]), date=tb.day_chinese[opened], place=place
            )
            record["narrative"] = lead + self._more(named[len(roles) :]) if extra else lead
        record["persons"] = [{"national_id": p[0], "role": role} for p, role in named]
        return record

    def _cast(
        self,
        people: list[Person],
        roles: tuple[str, ...],
        needs: tuple[int, ...],
        extra: tuple[str, ...],
    ) -> tuple[list[tuple[Person, str]], int] | None:
        """People for the template's roles and the extra ones, none twice, each old enough
        for the role on some common date; with the latest such date (days before the
        reference). None if a template role cannot be filled."""
        min_days = self._t.min_days
        named: list[tuple[Person, str]] = []
        used: list[str] = []
        latest = CASE_WINDOW_DAYS
        for role, need in (*zip(roles, needs, strict=True), *((r, min_days[r]) for r in extra)):
            for _ in range(PICK_TRIES):
                person = self._pick(people)
                room = person[4] - need
                if room >= 0 and person[0] not in used:
                    named.append((person, role))
                    used.append(person[0])
                    latest = min(latest, room)
                    break
            else:
                if len(named) < len(roles):
                    return None
        return named, latest

    def _more(self, named: Sequence[tuple[Person, str]]) -> str:
        """At most two sentences naming everyone beyond the lead sentence, by role."""
        groups: dict[str, list[str]] = {}
        for person, role in named:
            groups.setdefault(role, []).append(person[1])
        text = ""
        rand = self._rng.random
        for i, (role, names) in enumerate(groups.items()):
            if i == 1 and len(groups) > 2:
                rest = [n for ns in list(groups.values())[1:] for n in ns]
                return text + T.OTHERS_SENTENCE.format(names="、".join(rest))
            phrases = T.ROLE_SENTENCES[role]
            text += phrases[int(rand() * len(phrases))].format(names="、".join(names))
        return text

    def _delivery(self, people: list[Person]) -> Record:
        tb = self._t
        rand, bits = self._rng.random, self._rng.getrandbits
        day_age = tb.day_age
        person = self._pick(people)
        for _ in range(3):
            if day_age[person[4]] >= RECIPIENT_AGE:
                break
            person = self._pick(people)
        national_id, name, phone, address, t, home = person

        number = (self._waybill_mult * self._waybills + self._waybill_add) % _WAYBILL_SPACE
        self._waybills += 1
        prefixes = T.WAYBILL_PREFIXES
        record: Record = {
            "type": "delivery",
            "waybill_no": f"{prefixes[bits(2)]}{number:012d}",
            "recipient_name": name,
        }
        if phone is None and rand() < 0.5:
            # A parent's or a colleague's number.
            phone = f"{tb.phone_prefix[bits(PREFIX_BITS)]}{int(rand() * 1e8):08d}"
        if phone is not None:
            record["phone"] = phone
        if address is None or rand() < WORKPLACE_SHARE:
            address = (
                tb.area_address[home]
                + tb.streets[bits(STREET_BITS)]
                + tb.house_numbers[bits(8)]
                + T.WORKPLACES[int(rand() * len(T.WORKPLACES))]
                + f"{int(rand() * 30) + 1}层"
            )
        record["address"] = address
        if rand() < DELIVERY_DATE_SHARE:
            record["delivered_on"] = tb.day_iso[int(rand() * min(DELIVERY_WINDOW_DAYS, t))]
        record["recipient"] = national_id
        return record
