{{/*
The operator's name: its Deployment, Services, ServiceAccount, RBAC, webhook configuration and
Lease. Not derived from the release name: proxies and gateway pods reach "l4proxy-operator".
*/}}
{{- define "l4proxy.fullname" -}}
{{- default "l4proxy-operator" .Values.fullnameOverride | trunc 55 | trimSuffix "-" -}}
{{- end -}}

{{- define "l4proxy.selectorLabels" -}}
app.kubernetes.io/name: l4proxy-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "l4proxy.labels" -}}
{{ include "l4proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: l4proxy
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* An image reference from {repository, tag}; the tag defaults to the chart's appVersion. */}}
{{- define "l4proxy.image" -}}
{{- printf "%s:%s" .image.repository (default .chart.AppVersion .image.tag) -}}
{{- end -}}

{{/*
The names in the one serving certificate: the config service's Service and the webhook's, each
as name, name.namespace and name.namespace.svc.
*/}}
{{- define "l4proxy.dnsNames" -}}
{{- $names := list -}}
{{- range $service := list (include "l4proxy.fullname" .) (printf "%s-webhook" (include "l4proxy.fullname" .)) -}}
{{- $names = concat $names (list $service (printf "%s.%s" $service $.Release.Namespace) (printf "%s.%s.svc" $service $.Release.Namespace)) -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}
