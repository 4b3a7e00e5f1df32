"""A minimal org.freedesktop.Notifications service that records each call.

usage: notify_service.py BUS_ADDRESS OUTPUT_FILE [CAPABILITIES]   (prints "ready" once it owns the name)
CAPABILITIES: what GetCapabilities answers, comma separated (default "body"; a
server that takes markup says "body,body-markup").
Each Notify call is appended to OUTPUT_FILE as one JSON line, with the time it came.
"""
import json
import sys
import time

import dbus
import dbus.mainloop.glib
import dbus.service
from gi.repository import GLib

IFACE = "org.freedesktop.Notifications"


class Notifications(dbus.service.Object):
    def __init__(self, bus, output, capabilities):
        super().__init__(bus, "/org/freedesktop/Notifications")
        self.output, self.count, self.capabilities = output, 0, capabilities

    @dbus.service.method(IFACE, in_signature="susssasa{sv}i", out_signature="u")
    def Notify(self, app, replaces, icon, summary, body, actions, hints, timeout):
        self.count += 1
        with open(self.output, "a") as f:
            f.write(json.dumps({"app": str(app), "summary": str(summary), "body": str(body),
                                "time": time.time()}) + "\n")
        return self.count

    @dbus.service.method(IFACE, in_signature="", out_signature="as")
    def GetCapabilities(self):
        return self.capabilities

    @dbus.service.method(IFACE, in_signature="", out_signature="ssss")
    def GetServerInformation(self):
        return ("picosnitch-test", "picosnitch", "1", "1.2")


def main(address, output, capabilities="body"):
    dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
    bus = dbus.bus.BusConnection(address)
    name = dbus.service.BusName(IFACE, bus)  # noqa: F841 - owning the name keeps it
    Notifications(bus, output, capabilities.split(","))
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main(*sys.argv[1:])
