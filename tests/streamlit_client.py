"""A Streamlit client without a browser: it speaks the page's own protocol to a running `streamlit` server.

The page's JavaScript opens a websocket at `/_stcore/stream`, sends `BackMsg` protobufs (rerun the script with
these widget values) and draws the `ForwardMsg` deltas the server sends back (each element, at its path in the
page, as the script writes it). This does the same with Streamlit's own message classes, so a test sees every
version of every element the server sent — what the browser would have drawn — on a machine without Chromium.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.Common_pb2 import ChatInputValue
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState, WidgetStates
from websockets.sync.client import ClientConnection, connect


@dataclass
class Drawn:
    """One element the server drew: where (its delta path), what kind, and the element's protobuf."""

    path: tuple[int, ...]
    kind: str
    element: Any


@dataclass
class StreamlitSession:
    """One browser tab's session on a Streamlit server, driven through its websocket."""

    ws: ClientConnection
    widgets: dict[str, WidgetState] = field(default_factory=dict)  # what the page would send on each rerun

    def rerun(self, timeout: float = 120.0, **trigger: WidgetState) -> list[Drawn]:
        """Run the script with the widget values set so far (plus a one-off trigger such as a chat message);
        -> every element drawn, in the order the server sent them, up to the end of the run."""
        message = BackMsg()
        states = [*self.widgets.values(), *trigger.values()]
        message.rerun_script.widget_states.CopyFrom(WidgetStates(widgets=states))
        self.ws.send(message.SerializeToString())
        drawn = []
        while True:
            forward = ForwardMsg()
            forward.ParseFromString(self.ws.recv(timeout=timeout))
            kind = forward.WhichOneof("type")
            if kind == "script_finished":
                return drawn
            if kind == "delta":
                path = tuple(forward.metadata.delta_path)
                delta = forward.delta
                if delta.WhichOneof("type") == "new_element":
                    element_kind = delta.new_element.WhichOneof("type")
                    drawn.append(Drawn(path, element_kind, getattr(delta.new_element, element_kind)))
                elif delta.WhichOneof("type") == "add_block":
                    drawn.append(Drawn(path, "block:" + (delta.add_block.WhichOneof("type") or ""), delta.add_block))

    def set_number(self, drawn: list[Drawn], label: str, value: int) -> list[Drawn]:
        """Type `value` into the integer number input labelled `label` (the page reruns, as on Enter)."""
        widget = next(d.element for d in drawn if d.kind == "number_input" and d.element.label == label)
        self.widgets[widget.id] = WidgetState(id=widget.id, int_value=value)
        return self.rerun()

    def send_chat(self, drawn: list[Drawn], text: str) -> list[Drawn]:
        """Submit `text` in the page's chat input; -> what the run that answers it drew."""
        widget = next(d.element for d in drawn if d.kind == "chat_input")
        return self.rerun(chat=WidgetState(id=widget.id, chat_input_value=ChatInputValue(data=text)))


@contextmanager
def streamlit_session(url: str) -> Iterator[StreamlitSession]:
    """A new session on the server at `url` (http://host:port), closed at the end."""
    with connect(url.replace("http://", "ws://") + "/_stcore/stream", subprotocols=["streamlit"], max_size=None,
                 open_timeout=60) as ws:
        yield StreamlitSession(ws)


def last_chat_message_texts(drawn: list[Drawn]) -> list[str]:
    """The text of the last chat message after each element drawn into it, as the page showed it over time."""
    messages = [d.path for d in drawn if d.kind == "block:chat_message"]
    last = messages[-1]
    shown: dict[tuple[int, ...], str] = {}
    texts = []
    for d in drawn:
        if d.path[:len(last)] != last or d.path == last:
            continue
        if d.kind.startswith("block:"):  # a container redrawn from scratch (st.empty().container())
            shown = {p: t for p, t in shown.items() if p[:len(d.path)] != d.path}
            continue
        if d.kind == "markdown":
            shown[d.path] = d.element.body
            texts.append("\n".join(shown[p] for p in sorted(shown)))
    return texts
