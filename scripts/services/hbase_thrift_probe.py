#!/usr/bin/env python3
"""Tiny HBase Thrift1 client (binary protocol, buffered transport), stdlib only.

scripts/services.sh uses it to prove the gateway really reaches HBase (a
getTableNames that returns means master, meta and regionserver are all up),
and it is handy for checking that data survives a restart:

    hbase_thrift_probe.py [--host H] [--port P] tables
    hbase_thrift_probe.py create TABLE FAMILY
    hbase_thrift_probe.py put TABLE ROW FAMILY:QUALIFIER VALUE
    hbase_thrift_probe.py get TABLE ROW
    hbase_thrift_probe.py drop TABLE          (disable + delete)

Exit status 0 on success; 1 with a message on stderr otherwise.
"""
import argparse
import socket
import struct
import sys

# Thrift type ids.
T_STOP, T_BOOL, T_BYTE, T_DOUBLE = 0, 2, 3, 4
T_I16, T_I32, T_I64, T_STRING = 6, 8, 10, 11
T_STRUCT, T_MAP, T_SET, T_LIST = 12, 13, 14, 15
VERSION_1 = 0x80010000
CALL, REPLY, EXCEPTION = 1, 2, 3


class Writer:
    def __init__(self):
        self.buf = bytearray()

    def i8(self, v):
        self.buf += struct.pack("!b", v)

    def i16(self, v):
        self.buf += struct.pack("!h", v)

    def i32(self, v):
        self.buf += struct.pack("!i", v)

    def binary(self, v):
        if isinstance(v, str):
            v = v.encode()
        self.i32(len(v))
        self.buf += v

    def field(self, ttype, fid):
        self.i8(ttype)
        self.i16(fid)

    def stop(self):
        self.i8(T_STOP)


class Reader:
    def __init__(self, sock):
        self.sock = sock

    def read(self, n):
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("connection closed by the Thrift server")
            out += chunk
        return bytes(out)

    def i8(self):
        return struct.unpack("!b", self.read(1))[0]

    def i16(self):
        return struct.unpack("!h", self.read(2))[0]

    def i32(self):
        return struct.unpack("!i", self.read(4))[0]

    def binary(self):
        return self.read(self.i32())

    def value(self, ttype):
        """Reads any value generically: structs become {field id: value}."""
        if ttype == T_BOOL:
            return self.i8() != 0
        if ttype == T_BYTE:
            return self.i8()
        if ttype == T_I16:
            return self.i16()
        if ttype == T_I32:
            return self.i32()
        if ttype == T_I64:
            return struct.unpack("!q", self.read(8))[0]
        if ttype == T_DOUBLE:
            return struct.unpack("!d", self.read(8))[0]
        if ttype == T_STRING:
            return self.binary()
        if ttype == T_STRUCT:
            out = {}
            while True:
                ftype = self.i8()
                if ftype == T_STOP:
                    return out
                fid = self.i16()
                out[fid] = self.value(ftype)
        if ttype == T_MAP:
            ktype, vtype, n = self.i8(), self.i8(), self.i32()
            return {self._key(self.value(ktype)): self.value(vtype) for _ in range(n)}
        if ttype in (T_LIST, T_SET):
            etype, n = self.i8(), self.i32()
            return [self.value(etype) for _ in range(n)]
        raise ValueError(f"unknown thrift type {ttype}")

    @staticmethod
    def _key(k):
        return k if isinstance(k, (bytes, int, str)) else repr(k)


def call(host, port, name, write_args, timeout):
    w = Writer()
    w.buf += struct.pack("!I", VERSION_1 | CALL)
    w.binary(name)
    w.i32(1)
    write_args(w)
    w.stop()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(w.buf)
        r = Reader(sock)
        head = r.i32()
        if head & 0xFFFF0000 != VERSION_1:
            raise ValueError("not a strict binary Thrift reply (got 0x%08x)" % (head & 0xFFFFFFFF))
        r.binary()  # method name
        r.i32()  # seqid
        body = r.value(T_STRUCT)
        if head & 0xFF == EXCEPTION:
            raise RuntimeError(f"Thrift application exception: {body.get(1)!r}")
        for fid, val in body.items():
            if fid != 0:
                # Declared exceptions (IOError, IllegalArgument, AlreadyExists)
                # carry their message in field 1.
                msg = val.get(1) if isinstance(val, dict) else val
                raise RuntimeError("HBase error: %s" % (msg.decode(errors="replace") if isinstance(msg, bytes) else msg))
        return body.get(0)


def empty_attributes(w, fid):
    w.field(T_MAP, fid)
    w.i8(T_STRING)
    w.i8(T_STRING)
    w.i32(0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("cmd", choices=["tables", "create", "put", "get", "drop"])
    p.add_argument("args", nargs="*")
    a = p.parse_args()

    def do(name, write_args):
        return call(a.host, a.port, name, write_args, a.timeout)

    if a.cmd == "tables":
        for t in do("getTableNames", lambda w: None) or []:
            print(t.decode(errors="replace"))
    elif a.cmd == "create":
        table, family = a.args

        def args(w):
            w.field(T_STRING, 1)
            w.binary(table)
            w.field(T_LIST, 2)
            w.i8(T_STRUCT)
            w.i32(1)
            # ColumnDescriptor: only the name; the server fills in the
            # defaults declared in Hbase.thrift.
            w.field(T_STRING, 1)
            w.binary(family + ":")
            w.stop()

        do("createTable", args)
    elif a.cmd == "drop":
        (table,) = a.args

        def args(w):
            w.field(T_STRING, 1)
            w.binary(table)

        do("disableTable", args)
        do("deleteTable", args)
    elif a.cmd == "put":
        table, row, column, value = a.args

        def args(w):
            w.field(T_STRING, 1)
            w.binary(table)
            w.field(T_STRING, 2)
            w.binary(row)
            w.field(T_LIST, 3)
            w.i8(T_STRUCT)
            w.i32(1)
            w.field(T_BOOL, 1)
            w.i8(0)
            w.field(T_STRING, 2)
            w.binary(column)
            w.field(T_STRING, 3)
            w.binary(value)
            w.field(T_BOOL, 4)
            w.i8(1)
            w.stop()
            empty_attributes(w, 4)

        do("mutateRow", args)
    elif a.cmd == "get":
        table, row = a.args

        def args(w):
            w.field(T_STRING, 1)
            w.binary(table)
            w.field(T_STRING, 2)
            w.binary(row)
            empty_attributes(w, 3)

        rows = do("getRow", args) or []
        if not rows:
            print("row not found", file=sys.stderr)
            return 1
        for r in rows:
            # TRowResult: 1 row, 2 map<column, TCell{1 value, 2 timestamp}>
            for col, cell in sorted((r.get(2) or {}).items()):
                value = cell.get(1, b"").decode(errors="replace")
                print(f"{col.decode(errors='replace')}={value}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 -- a probe: one line is what the caller wants
        print(f"hbase_thrift_probe: {e}", file=sys.stderr)
        sys.exit(1)
