"""A small writer of MaxMind DB files (format 2.0), enough to build a country
database like DB-IP's country lite one for the tests: an IPv6 tree with
IPv4 networks under ::/96, 24-bit records, maps, strings and integers."""
import ipaddress
import struct
import time

TYPES = {"pointer": 1, "string": 2, "map": 7, "uint16": 5, "uint32": 6, "uint64": 9, "array": 11}


def _control(kind, size):
    number = TYPES[kind]
    if size < 29:
        head, extra = size, b""
    elif size < 285:
        head, extra = 29, bytes([size - 29])
    elif size < 65821:
        head, extra = 30, struct.pack(">H", size - 285)
    else:
        head, extra = 31, struct.pack(">I", size - 65821)[1:]
    if number <= 7:
        return bytes([(number << 5) | head]) + extra
    return bytes([head, number - 7]) + extra


def encode(value):
    if isinstance(value, str):
        raw = value.encode()
        return _control("string", len(raw)) + raw
    if isinstance(value, dict):
        return _control("map", len(value)) + b"".join(encode(k) + encode(v) for k, v in value.items())
    if isinstance(value, list):
        return _control("array", len(value)) + b"".join(encode(v) for v in value)
    if isinstance(value, tuple):        # (kind, int) for an unsigned integer of that kind
        kind, number = value
        raw = number.to_bytes(8, "big").lstrip(b"\0")
        return _control(kind, len(raw)) + raw
    raise TypeError(value)


def _bits(network):
    net = ipaddress.ip_network(network)
    value, length = int(net.network_address), net.prefixlen
    if net.version == 4:                # IPv4 lives under ::/96
        length += 96
    return [(value >> (127 - i)) & 1 for i in range(128)][:length] if net.version == 6 else \
        [0] * 96 + [(value >> (31 - i)) & 1 for i in range(32)][:length - 96]


def build(countries, database_type="DBIP-Country-Lite"):
    """countries: {network: iso_code}. Returns the bytes of an .mmdb file."""
    data, offsets = b"", {}
    root = [None, None]
    for network, code in countries.items():
        if code not in offsets:
            offsets[code] = len(data)
            data += encode({"country": {"iso_code": code, "names": {"en": code}}})
        node, bits = root, _bits(network)
        for bit in bits[:-1]:
            if not isinstance(node[bit], list):
                node[bit] = [None, None]
            node = node[bit]
        node[bits[-1]] = ("data", offsets[code])
    order, queue = [], [root]
    while queue:                        # number the nodes breadth first
        node = queue.pop(0)
        order.append(node)
        queue.extend(child for child in node if isinstance(child, list))
    ids = {id(node): i for i, node in enumerate(order)}
    count = len(order)

    def record(child):
        if child is None:
            return count
        if isinstance(child, list):
            return ids[id(child)]
        return count + 16 + child[1]
    tree = b"".join(record(n[0]).to_bytes(3, "big") + record(n[1]).to_bytes(3, "big") for n in order)
    metadata = encode({"node_count": ("uint32", count), "record_size": ("uint16", 24), "ip_version": ("uint16", 6),
                       "database_type": database_type, "languages": ["en"],
                       "binary_format_major_version": ("uint16", 2), "binary_format_minor_version": ("uint16", 0),
                       "build_epoch": ("uint64", int(time.time())), "description": {"en": "picosnitch test"}})
    return tree + b"\0" * 16 + data + b"\xab\xcd\xefMaxMind.com" + metadata
