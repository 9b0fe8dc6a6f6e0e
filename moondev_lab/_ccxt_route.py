"""The live route on a spot exchange: a strategy's decisions as real orders, sl/tp included.

- **Entries.** Market orders; ``limit=`` as a LIMIT order; ``stop=`` as a stop-loss-limit
  buy (ccxt's ``stopLossPrice``, Binance ``STOP_LOSS_LIMIT``) limited ``stop_limit_offset``
  above its stop; ``stop=`` and ``limit=`` as a stop-limit. A stop the price has already
  passed becomes what the backtest would do at the next open: a market (or plain limit) order.
- **sl/tp.** Placed once the entry has filled (market: at once; limit/stop: when a bar's
  check finds it filled), covering what was bought: both as one OCO list (take-profit
  LIMIT_MAKER + stop-loss STOP_LOSS_LIMIT; spot locks the coins once, so two separate sell
  orders could not both rest), or the one given alone (stop-loss limit, or a plain limit
  sell at the take-profit). One leg filling expires the other (the exchange does it).
  A new ``trade.sl``/``trade.tp`` replaces the orders; a close, or a sell, cancels them
  first. A stop that would trigger at once is a market sell at once, as the backtest
  fills it at the next open.
- **Ids.** Every order carries a deterministic client id. The legs' ids derive from the
  decision that set them (its sequence number + 1000 x leg), so a restart finds them by id
  (looked up before anything is sent) instead of placing them twice.
- **Restart.** :meth:`observe` rebuilds the wanted state from the replayed decisions;
  :meth:`resume` cancels this strategy's contingent orders that state does not want, and
  :meth:`sync` places what is missing (an entry that filled while the runner was down).
- **Spot.** No shorts: a sell for more than the account holds is refused with one clear
  error; so are shapes spot cannot hold (a second entry next to a working sl/tp, removing an
  sl/tp without a new one). The runner refuses ``exclusive_orders`` and ``hedging`` live.
- **Checks.** The runner compares the account with the strategy's broker after each bar; fills
  the exchange made on these resting orders after that bar closed (it runs ahead of a runner
  that polls once a bar) are left out (:meth:`unseen_fills`). A stop-loss limit that a gap
  jumps past rests unfilled while the backtest would have exited at the open: that shows as
  drift, and stops trading.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import ExchangeError, OrderNotFound, OrderRejected
from .exchange.orders import ClientOrderId, Order, OrderState
from .live import _CANCEL, _CLOSE, _CONTINGENT, _NEW, CannotExpress, Decision, Route

#: Leg numbers in derived client ids (sequence number + 1000 x leg; a bar has at most 1000 decisions).
_LIST, _TP, _SL, _NOW, _EXIT = 1, 2, 3, 4, 5
#: A bracket whose legs were cancelled before they could work (a crash between replacing an sl/tp and
#: committing the bar, a hand on the exchange's web page) is placed once more under these leg numbers.
_ALT = 5
#: The exchange's answers that mean "this stop/limit would fill right now".
_IMMEDIATE = ("would trigger immediately", "immediately match", "relationship of the prices")


def leg_id(cid: str, leg: int) -> ClientOrderId:
    """The id of leg ``leg`` of the contingent orders a decision ``cid`` set.

    >>> leg_id("ml-smacross-50670e-240101121500-3", 3)
    'ml-smacross-50670e-240101121500-3003'
    """
    cid = ClientOrderId(cid)
    if cid.seq is None or cid.seq >= 1000:
        raise CannotExpress(f"{cid}: a contingent order needs a decision id with a sequence number below 1000")
    return ClientOrderId(f"{cid.rpartition('-')[0]}-{1000 * leg + cid.seq}")


def is_leg(cid: str) -> bool:
    seq = ClientOrderId(cid).seq
    return seq is not None and seq >= 1000


@dataclass
class Bracket:
    """The sl/tp wanted on the open position, and the exchange orders working for it."""

    sl: float
    tp: float
    amount: float                                    # base units covered
    gen: str                                         # the decision (client id) that set it
    legs: list[str] = field(default_factory=list)    # client ids working on the exchange

    def leg_ids(self, alt: bool = False) -> list[ClientOrderId]:
        has_sl, has_tp = not math.isnan(self.sl), not math.isnan(self.tp)
        return [leg_id(self.gen, k + _ALT * alt) for k, on in ((_TP, has_tp), (_SL, has_sl)) if on]


class CcxtRoute(Route):
    """Decisions as spot orders on an :class:`~moondev_lab.exchange.ExchangeManager` (see the module doc).

    Sizes are whole strategy units times ``unit`` base units; a fraction-of-equity size of a
    limit or stop entry becomes units at its own price (the market ones arrive as units).
    """

    #: A stop-loss limit order may fill down to this fraction past its trigger (a gap further rests).
    stop_limit_offset = 0.005

    def __init__(self, exchange, symbol: str, unit: float = 1.0):
        super().__init__(exchange, symbol, unit)
        self.pending: dict[str, tuple[float, float]] = {}   # resting entries with sl/tp -> (sl, tp)
        self.bracket: Bracket | None = None
        self.stale: list[str] = []                           # legs to cancel before anything else
        self._cancel_pending_leg = False                     # a contingent order's cancel, awaiting its new one
        self.recent: list[Order] = []                        # resting orders the exchange filled, not yet seen
        self.equity = math.nan

    # ------------------------------------------------------------------ account
    def position(self) -> float:
        base = self.symbol.partition("/")[0]
        bal = self.exchange.fetch_balance().get(base)
        return float(bal.total) / self.unit if bal is not None else 0.0

    def _units(self, d: Decision, price: float) -> float:
        if abs(d.size) >= 1:
            return abs(d.size)
        at = d.limit if not math.isnan(d.limit) else d.stop if not math.isnan(d.stop) else price
        return float(math.floor(abs(d.size) * max(self.equity, 0.0) / at)) if at > 0 else 0.0

    # ------------------------------------------------------------------ what spot can hold
    def check(self, d: Decision) -> None:
        name = self.exchange.name
        if d.kind != _NEW:
            return
        if d.side == "sell":
            held = self.position()
            units = self._units(d, d.limit if not math.isnan(d.limit) else math.nan)
            if units > held + 1e-9:
                raise CannotExpress(f"{name} spot cannot short: the strategy sells {units:g} units while the "
                                    f"account holds {held:g} (shorts need a margin or futures account)")
            if self.bracket is not None and (not math.isnan(d.limit) or not math.isnan(d.stop)):
                raise CannotExpress(f"{name} spot: a resting sell next to the trade's sl/tp (the coins are "
                                    "locked by them once)")
        else:
            if self.bracket is not None:
                raise CannotExpress(f"{name} spot: a second entry while the first trade's sl/tp orders work "
                                    "(they cover one trade's coins; spot cannot hold one bracket per trade)")
            if (not math.isnan(d.sl) or not math.isnan(d.tp)) and (self.pending or self.position() > 1e-9):
                raise CannotExpress(f"{name} spot: sl/tp for one trade at a time (an entry with sl/tp while "
                                    "another trade is open or waiting)")

    # ------------------------------------------------------------------ state from decisions
    def number(self, d: Decision) -> None:
        if d.kind == _NEW and d.ref >= 0:  # live rows carry the strategy broker's number for the order
            self.ordinal_cids.put(d.ref, str(d.cid))

    def observe(self, d: Decision, order: Order | None = None) -> None:
        """Update the wanted sl/tp state from a decision (sent now, or replayed after a restart)."""
        if d.kind == _NEW:
            if not math.isnan(d.sl) or not math.isnan(d.tp):
                self.pending[str(d.cid)] = (d.sl, d.tp)
            if d.side == "sell" and self.bracket is not None:  # a sell closes (part of) the long first
                self._shrink(d, abs(d.size) * self.unit)
        elif d.kind == _CANCEL:
            cid = self.ordinal_cids.get(d.ref)
            if cid is not None:
                self.pending.pop(cid, None)
            else:  # not an entry of ours: one of the trade's sl/tp orders (a new one may follow)
                self._cancel_pending_leg = True
        elif d.kind == _CONTINGENT:
            self._cancel_pending_leg = False
            b = self.bracket
            if b is None and self.pending:
                # Replayed after a restart: the strategy's broker holds the trade, so its entry filled.
                entry, (sl, tp) = self.pending.popitem()
                self.bracket = b = Bracket(sl, tp, abs(d.size) * self.unit, entry)
            if b is None:
                b = Bracket(math.nan, math.nan, abs(d.size) * self.unit, str(d.cid))
            else:
                self.stale += b.legs
                b = Bracket(b.sl, b.tp, b.amount, str(d.cid))
            if not math.isnan(d.stop):
                b.sl = d.stop
            else:
                b.tp = d.limit
            self.bracket = b
        elif d.kind == _CLOSE and self.bracket is not None:
            self._shrink(d, abs(d.size) * self.unit)

    def _shrink(self, d: Decision, amount: float) -> None:
        b = self.bracket
        self.stale += b.legs
        left = b.amount - amount
        self.bracket = Bracket(b.sl, b.tp, left, str(d.cid)) if left > 1e-12 else None

    def bar_done(self) -> None:
        """After a bar's decisions: a sl/tp cancelled and not replaced has no spot equivalent here."""
        if self._cancel_pending_leg:
            self._cancel_pending_leg = False
            raise CannotExpress(f"{self.exchange.name}: removing a trade's sl/tp (or cancelling a contingent "
                                "order) without a new one is not supported by the live route")

    # ------------------------------------------------------------------ orders
    def send(self, d: Decision, price: float) -> list[Order]:
        ex = self.exchange
        if d.kind == _CANCEL:
            cid = self.ordinal_cids.get(d.ref)
            self.observe(d)
            if cid is None:
                return []
            try:
                return [ex.cancel_order(cid, self.symbol)]
            except OrderNotFound:
                return []
        self.observe(d)
        out = self._cancel_stale()
        if d.kind == _CONTINGENT:
            return out + self.sync()
        units = self._units(d, price) * self.unit
        if d.kind == _CLOSE:
            out.append(ex.create_order(self.symbol, "market", d.side, units, price, client_order_id=d.cid))
        else:
            out.append(self._entry(d, units, price))
        return out + self.sync()

    def _entry(self, d: Decision, amount: float, price: float) -> Order:
        ex, buy = self.exchange, d.side == "buy"
        if math.isnan(d.stop):
            type_ = "limit" if not math.isnan(d.limit) else "market"
            return ex.create_order(self.symbol, type_, d.side, amount, d.limit if type_ == "limit" else price,
                                   client_order_id=d.cid)
        limit = d.limit if not math.isnan(d.limit) else \
            d.stop * (1 + self.stop_limit_offset if buy else 1 - self.stop_limit_offset)
        try:
            return ex.create_order(self.symbol, "limit", d.side, amount, limit, client_order_id=d.cid,
                                   params={"stopLossPrice": d.stop})
        except OrderRejected as e:
            if not _immediate(e):
                raise
        # The price is past the stop already: the backtest fills it at the next open (or as a plain limit).
        # The refused id cannot be used again, so the order goes out under its "now" leg id.
        now = leg_id(d.cid, _NOW)
        if not math.isnan(d.limit):
            return ex.create_order(self.symbol, "limit", d.side, amount, d.limit, client_order_id=now)
        return ex.create_order(self.symbol, "market", d.side, amount, price, client_order_id=now)

    def _cancel_stale(self) -> list[Order]:
        out = []
        while self.stale:
            cid = self.stale.pop(0)
            try:
                out.append(self.exchange.cancel_order(cid, self.symbol))
            except OrderNotFound:
                pass  # never placed (or an OCO sibling already gone with its list)
        return out

    def sync(self, place: bool = True) -> list[Order]:
        """Each bar: entries that filled get their sl/tp, a filled sl/tp ends the bracket; returns new orders.

        ``place=False``: learn what filled, but place nothing yet (the bar's decisions may replace it).
        """
        out = self._cancel_stale()
        self._entry_fills()
        ex, b = self.exchange, self.bracket
        if b is not None and b.legs:
            states = [ex.fetch_order(c, self.symbol) for c in b.legs]
            if any(s is not None and s.filled > 0 for s in states):
                self.bracket = None  # the exchange took the position out (the other leg expired)
                out += [s for s in states if s is not None]  # logged as they ended
                self.recent += [s for s in states if s is not None and s.filled > 0]
        elif b is not None and place:
            out += self._place(b)
        return out

    def _entry_fills(self) -> None:
        """Entries with sl/tp that filled: their bracket is wanted now."""
        ex = self.exchange
        for cid, (sl, tp) in list(self.pending.items()):
            o = ex.fetch_order(cid, self.symbol)
            if o is None or o.status == OrderState.REJECTED:
                o = ex.fetch_order(leg_id(cid, _NOW), self.symbol)  # sent at once, under its "now" id
            if o is None or o.status in (OrderState.CANCELED, OrderState.REJECTED):
                self.pending.pop(cid)
            elif o.status == OrderState.FILLED:
                self.pending.pop(cid)
                self.recent.append(o)
                self.bracket = Bracket(sl, tp, o.filled, cid)

    def _place(self, b: Bracket) -> list[Order]:
        ex = self.exchange
        for alt in (False, True):
            ids = b.leg_ids(alt)
            if not ids or b.amount <= 0:
                self.bracket = None
                return []
            found = [ex.fetch_order(c, self.symbol) for c in ids]  # placed before a crash: never again
            if any(f is None for f in found):
                break
            if not all(f.status == OrderState.CANCELED and not f.filled for f in found):
                b.legs = [str(c) for c in ids]
                return found
        else:
            raise CannotExpress(f"{self.exchange.name}: the sl/tp orders {', '.join(map(str, ids))} were "
                                "cancelled twice outside this runner; their ids cannot be used again")
        sl_limit = b.sl * (1 - self.stop_limit_offset) if not math.isnan(b.sl) else math.nan
        try:
            if len(ids) == 2:
                legs = ex.create_oco(self.symbol, "sell", b.amount, take_profit=b.tp, stop_loss=b.sl,
                                     stop_limit=sl_limit, client_order_id=leg_id(b.gen, _LIST + _ALT * alt),
                                     leg_ids=(str(ids[0]), str(ids[1])))
            elif not math.isnan(b.sl):
                legs = [ex.create_order(self.symbol, "limit", "sell", b.amount, sl_limit, client_order_id=ids[0],
                                        params={"stopLossPrice": b.sl})]
            else:
                legs = [ex.create_order(self.symbol, "limit", "sell", b.amount, b.tp, client_order_id=ids[0])]
        except OrderRejected as e:
            if not _immediate(e):
                raise
            # Already past a level: the backtest exits at the next open; so does the account, now.
            self.bracket = None
            return [ex.create_order(self.symbol, "market", "sell", b.amount, None,
                                    client_order_id=leg_id(b.gen, _EXIT))]
        b.legs = [str(c) for c in ids]
        if any(o.status == OrderState.FILLED for o in legs):  # a take-profit limit below the price fills at once
            self.bracket = None
        return legs

    def unseen_fills(self, after_ms: int) -> float:
        """Units bought (+) or sold (-) by our resting orders in the exchange since ``after_ms``.

        A stop-loss can fill in the bar after the one the runner is checking, before the runner
        got to it (it polls once a bar); those fills are not drift.
        """
        cids = list(self.pending) + [str(leg_id(c, _NOW)) for c in self.pending]
        cids += self.bracket.legs if self.bracket is not None else []
        # Fills found by an earlier bar's sync count until a check reaches the bar they were in.
        self.recent = [o for o in self.recent if o.updated is not None and o.updated >= after_ms]
        total = 0.0
        for o in self.recent + [self.exchange.fetch_order(c, self.symbol) for c in cids]:
            if o is not None and o.filled > 0 and o.updated is not None and o.updated >= after_ms:
                total += (o.filled if o.side == "buy" else -o.filled) / self.unit
        return total

    # ------------------------------------------------------------------ restart
    def resume(self, open_orders: list[Order], strategy: str, through=None) -> list[Order]:
        """After a restart's rebuild: cancel this strategy's contingent orders the state does not want.

        Only those set by bars up to ``through`` (the last committed bar): a crash in the middle
        of the next bar may have placed its legs, and deciding that bar again will find them.
        The wanted legs found working are adopted; missing ones are placed by the runner's
        :meth:`sync` after the next bar's decisions, which may replace them.
        """
        self._entry_fills()
        b = self.bracket
        wanted = {str(c) for alt in (False, True) for c in b.leg_ids(alt)} if b is not None else set()
        out = []
        for o in open_orders:
            cid = o.client_order_id
            if cid.ours and cid.belongs_to(strategy) and is_leg(cid) and str(cid) not in wanted \
                    and (through is None or cid.bar_time <= through):
                out.append(self.exchange.cancel_order(cid, self.symbol))
        for alt in (False, True):  # adopt the legs working for the bracket; placing waits for the next bar
            ids = [str(c) for c in b.leg_ids(alt)] if b is not None else []
            found = [self.exchange.fetch_order(c, self.symbol) for c in ids]
            if any(f is not None and f.filled > 0 for f in found):  # they took the position out meanwhile
                self.recent += [f for f in found if f is not None and f.filled > 0]
                self.bracket = None
                break
            if ids and all(f is not None and f.status.open for f in found):
                b.legs = ids
                break
        return out


def _immediate(e: ExchangeError) -> bool:
    return any(m in str(e) for m in _IMMEDIATE)
